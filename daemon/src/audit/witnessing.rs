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
//! stored. The store is trusted for what this daemon wrote.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Bytes;

use super::witness::{verify_cosignatures, AddCheckpoint, CosignerKey};
use crate::cli::https::{Endpoint, Limits};
use crate::config::{WitnessEndpoint, WitnessSettings};
use crate::metrics::Metrics;
use crate::store::{AuditStore, Cosignature, StoreError};

/// How many stored cosignature rows serving looks at, newest first: enough
/// for a quorum that lags this many checkpoints behind the newest one.
const SERVE_SCAN_ROWS: u64 = 1024;
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
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The witnesses of one daemon: settings, the submitters' wake-up, and the
/// waiters' wake-up.
pub struct Witnessing {
    settings: WitnessSettings,
    store: Arc<dyn AuditStore>,
    metrics: Option<Arc<Metrics>>,
    /// The newest size this process signed: wakes the submitters.
    signed: tokio::sync::watch::Sender<u64>,
    /// Bumped when this process stores a cosignature: wakes the waiters.
    stored: (Mutex<u64>, Condvar),
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
        settings: WitnessSettings,
        store: Arc<dyn AuditStore>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Witnessing {
            settings,
            store,
            metrics,
            signed: tokio::sync::watch::channel(0).0,
            stored: (Mutex::new(0), Condvar::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &WitnessSettings {
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

    /// Among `rows` (largest size first), the largest size whose
    /// cosignatures meet the quorum, with those cosignatures.
    fn first_quorum(&self, rows: &[Cosignature]) -> Option<(u64, Vec<String>)> {
        let mut i = 0;
        while i < rows.len() {
            let size = rows[i].size;
            let group: Vec<&Cosignature> =
                rows[i..].iter().take_while(|c| c.size == size).collect();
            i += group.len();
            let keys = group.iter().filter_map(|c| self.key(&c.witness));
            if self.settings.policy.quorum_met_by(keys) {
                return Some((size, group.iter().map(|c| c.line.clone()).collect()));
            }
        }
        None
    }

    /// The note of size `size` with `lines` appended.
    fn with_lines(&self, size: u64, lines: &[String]) -> Result<Option<String>, StoreError> {
        Ok(self.store.checkpoint_at(size)?.map(|mut note| {
            for line in lines {
                note.push_str(line);
            }
            note
        }))
    }

    /// The checkpoint to serve: the newest one the quorum cosigned, with
    /// all its cosignatures; before any is, the newest signed checkpoint
    /// with the cosignatures it has. `None` when the log has signed none.
    ///
    /// # Errors
    /// The store's.
    pub fn served(&self) -> Result<Option<String>, StoreError> {
        let rows = self.store.cosignatures(0, SERVE_SCAN_ROWS)?;
        if let Some((size, lines)) = self.first_quorum(&rows) {
            if let Some(note) = self.with_lines(size, &lines)? {
                return Ok(Some(note));
            }
        }
        let Some((size, mut note)) = self.store.latest_checkpoint()? else {
            return Ok(None);
        };
        for c in rows.iter().filter(|c| c.size == size) {
            note.push_str(&c.line);
        }
        Ok(Some(note))
    }

    /// A checkpoint of at least `size` leaves that the quorum cosigned, with
    /// its cosignatures, if the store has one now.
    ///
    /// # Errors
    /// The store's.
    pub fn quorum_covering(&self, size: u64) -> Result<Option<String>, StoreError> {
        let rows = self.store.cosignatures(size, SERVE_SCAN_ROWS)?;
        match self.first_quorum(&rows) {
            Some((at, lines)) => self.with_lines(at, &lines),
            None => Ok(None),
        }
    }

    /// Waits, blocking, until a checkpoint of at least `size` leaves is
    /// cosigned by the quorum (by this process's submitters or another
    /// replica's), for at most the configured `witness_timeout_secs`.
    ///
    /// # Errors
    /// [`WaitError::Timeout`]; the store's errors.
    pub fn wait_for_quorum(&self, size: u64) -> Result<String, WaitError> {
        let timeout = self.settings.timeout;
        let deadline = Instant::now() + timeout;
        let (lock, wake) = &self.stored;
        loop {
            let seen = *lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(note) = self.quorum_covering(size)? {
                return Ok(note);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout { size, timeout });
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
            let endpoint = Endpoint::new(&w.url, &w.ca_file, None)
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

    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn AuditStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .unwrap_or_else(|e| Err(StoreError::CommitFailed(format!("store task: {e}"))))
    }

    async fn submit_loop(self: Arc<Self>, w: WitnessEndpoint, endpoint: Endpoint) {
        let mut signed = self.signed.subscribe();
        let mut backoff = BACKOFF_MIN;
        let name = w.name.clone();
        if let Ok(Some(size)) = self.store_call(move |s| s.last_cosigned(&name)).await {
            if let Some(m) = &self.metrics {
                m.witness_cosigned(&w.name, size);
            }
        }
        loop {
            match self.submit_newest(&w, &endpoint).await {
                Ok(()) => backoff = BACKOFF_MIN,
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
    /// already. `Err` means: back off before the next try (already logged).
    async fn submit_newest(&self, w: &WitnessEndpoint, endpoint: &Endpoint) -> Result<(), ()> {
        let name = w.name.clone();
        let read = self
            .store_call(move |s| Ok((s.latest_checkpoint()?, s.last_cosigned(&name)?)))
            .await;
        let (latest, cosigned) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(witness = %w.name, error = %e, "witness submitter: store read failed");
                return Err(());
            }
        };
        let Some((size, note)) = latest else {
            return Ok(());
        };
        let mut old = cosigned.unwrap_or(0);
        if old >= size {
            return Ok(());
        }
        for _ in 0..=MAX_CONFLICT_RETRIES {
            match self.add_checkpoint(w, endpoint, old, size, &note).await? {
                Sent::Cosigned => return Ok(()),
                Sent::Learned(learned) => {
                    if learned == old || learned > size {
                        // The same size with another root (a fork of what
                        // it recorded), or more than this log has signed:
                        // the witness's view and ours disagree.
                        tracing::error!(
                            witness = %w.name, learned, old, size,
                            "witness reports a size it cannot have cosigned from this log's \
                             checkpoints (a fork, or another log with this origin); backing off"
                        );
                        return Err(());
                    }
                    old = learned;
                }
            }
        }
        tracing::error!(witness = %w.name, size, "witness keeps answering 409; backing off");
        Err(())
    }

    async fn add_checkpoint(
        &self,
        w: &WitnessEndpoint,
        endpoint: &Endpoint,
        old: u64,
        size: u64,
        note: &str,
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
            200 => self.cosigned(w, size, note, &text).await,
            409 => {
                let learned = (reply.content_type.as_deref() == Some("text/x.tlog.size"))
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
                            "witness answered 409 without a size: it holds a checkpoint of this \
                             size with another root (a fork?); backing off"
                        );
                        self.outcome(&w.name, "conflict");
                        Err(())
                    }
                }
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
            status => {
                tracing::warn!(witness = %w.name, status, body = %excerpt, "witness unavailable; will retry");
                self.outcome(&w.name, "unavailable");
                Err(())
            }
        }
    }

    /// A 200: keeps the first returned line that verifies under `w`'s key.
    async fn cosigned(
        &self,
        w: &WitnessEndpoint,
        size: u64,
        note: &str,
        body: &str,
    ) -> Result<Sent, ()> {
        let mut good = None;
        for line in body.split_inclusive('\n') {
            if !line.ends_with('\n') || !line.starts_with(super::note::SIG_PREFIX) {
                continue;
            }
            match verify_cosignatures(&format!("{note}{line}"), &w.key) {
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
            tracing::error!(witness = %w.name, size, "witness answered 200 without a valid cosignature by its key; backing off");
            self.outcome(&w.name, "bad_cosignature");
            return Err(());
        };
        let cosignature = Cosignature {
            size,
            witness: w.name.clone(),
            line,
        };
        if let Err(e) = self
            .store_call(move |s| s.save_cosignature(&cosignature))
            .await
        {
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

/// What one request achieved.
enum Sent {
    Cosigned,
    /// A 409 with the witness's size.
    Learned(u64),
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn size_bodies_are_read_strictly() {
        assert_eq!(parse_size("0\n"), Some(0));
        assert_eq!(parse_size("50\n"), Some(50));
        for bad in ["50", "050\n", "\n", "5 0\n", "-1\n", "50\n\n", "x\n"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
