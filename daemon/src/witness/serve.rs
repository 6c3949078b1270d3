//! The HTTP side of `lavd witness serve`: C2SP tlog-witness
//! `POST /add-checkpoint` over TLS without client certificates (a witness
//! authenticates nothing but the log's signature on the checkpoint), and an
//! admin listener with `/healthz`, `/readyz` and `/metrics`.
//!
//! Before the checks of [`WitnessState::add_checkpoint`]: the path and
//! method, a token bucket per client IPv4 address or IPv6 /64
//! ([`crate::api::ratelimit::peer_key`]), and the body bound
//! (`limits.max_body_bytes`, `limits.body_read_timeout_secs`). Those
//! refusals are lavd's JSON errors (404 `not_found`, 405, 429, 413, 408);
//! the answers of the spec are its own: 200 with the cosignature line, 409
//! with `text/x.tlog.size`, and 400, 403, 404, 422 with a one-line reason as
//! `text/plain`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use prometheus::{Encoder as _, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use warp::http::{header, HeaderValue, Method, Request, StatusCode};
use warp::reply::Response;

use super::WitnessState;
use crate::api::error::ApiError;
use crate::api::ratelimit::RateLimiter;
use crate::api::server::{self, Activity};
use crate::audit::note::VerifierKey;
use crate::audit::witness::{AddOutcome, CosignerKey};
use crate::config::{Limits, WitnessedLog};
use crate::hsm::{Hsm, HsmError};

/// The one route of the witness listener.
pub const ADD_CHECKPOINT_PATH: &str = "/add-checkpoint";
/// `Content-Type` of a 409 answer (C2SP tlog-witness).
pub const TLOG_SIZE_CONTENT_TYPE: &str = "text/x.tlog.size";

/// Where the witness's Ed25519 key is, and how to sign with it.
pub enum Signer {
    /// A key pair on an HSM token, signed with `CKM_EDDSA`.
    Hsm {
        /// The logged-in token.
        hsm: Hsm,
        /// `CKA_LABEL` of the key pair.
        label: String,
    },
    /// A key from a seed file (`dev = true` only).
    Dev(aws_lc_rs::signature::Ed25519KeyPair),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Hsm { label, .. } => write!(f, "Signer::Hsm({label})"),
            Signer::Dev(_) => f.write_str("Signer::Dev(..)"),
        }
    }
}

impl Signer {
    /// The public key.
    ///
    /// # Errors
    /// The HSM's, when the key is not on the token.
    pub fn public_key(&self) -> Result<[u8; 32], HsmError> {
        use aws_lc_rs::signature::KeyPair as _;
        match self {
            Signer::Hsm { hsm, label } => Ok(*hsm.audit_key(label)?.public.bytes()),
            Signer::Dev(pair) => pair
                .public_key()
                .as_ref()
                .try_into()
                .map_err(|_| HsmError::Wrapper("Ed25519 public key is not 32 bytes".into())),
        }
    }

    /// What the key is under: its label on the token, or "the dev key".
    pub fn label(&self) -> String {
        match self {
            Signer::Hsm { label, .. } => label.clone(),
            Signer::Dev(_) => "the dev key".to_string(),
        }
    }

    /// Signs `message` (pure Ed25519).
    ///
    /// # Errors
    /// The HSM's.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        match self {
            Signer::Hsm { hsm, label } => hsm.sign_ed25519(label, message),
            Signer::Dev(pair) => pair
                .sign(message)
                .as_ref()
                .try_into()
                .map_err(|_| HsmError::Wrapper("Ed25519 signature is not 64 bytes".into())),
        }
    }

    /// True when the key can be used now: the token has a logged-in session
    /// and still holds the key, the one `published` (read at start), not
    /// another put under its label since (always, for a dev key); see
    /// [`Hsm::check_ready`].
    fn ready(&self, published: &CosignerKey) -> bool {
        match self {
            Signer::Hsm { hsm, label } => {
                let same = |h: &Hsm| {
                    if h.audit_key(label)?.public.bytes() == published.public_key() {
                        Ok(())
                    } else {
                        Err(HsmError::KeyReplaced(label.clone()))
                    }
                };
                match hsm.check_ready(same) {
                    Ok(()) => true,
                    Err(why) => {
                        tracing::warn!(why, "the witness key cannot sign");
                        false
                    }
                }
            }
            Signer::Dev(_) => true,
        }
    }
}

/// The witness's metrics, in their own registry. Labels are the statuses
/// it answers and the origins of its config, never request data.
#[derive(Debug)]
pub struct WitnessMetrics {
    registry: Registry,
    requests: IntCounterVec,
    cosignatures: IntCounterVec,
    recorded_size: IntGaugeVec,
    /// Held while `recorded_size` is read and raised: two requests that
    /// cosigned one after the other may set it in the other order.
    raising: std::sync::Mutex<()>,
    body_bytes_held: IntGauge,
}

impl WitnessMetrics {
    /// Every metric, with a series per configured origin from the start.
    ///
    /// # Errors
    /// A prometheus error for an ill-formed metric (a bug: names are
    /// constants).
    pub fn new(origins: &[&str]) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "lavd_witness_requests_total",
                "add-checkpoint requests answered, by HTTP status.",
            ),
            &["status"],
        )?;
        let cosignatures = IntCounterVec::new(
            Opts::new(
                "lavd_witness_cosignatures_total",
                "Checkpoints cosigned, by log origin.",
            ),
            &["origin"],
        )?;
        let recorded_size = IntGaugeVec::new(
            Opts::new(
                "lavd_witness_recorded_size",
                "The tree size last cosigned, by log origin.",
            ),
            &["origin"],
        )?;
        let body_bytes_held = IntGauge::new(
            "lavd_witness_request_body_bytes_held",
            "Bytes of add-checkpoint bodies held now (read, or being read) out of \
             [limits] max_body_bytes_in_flight; a body that does not fit is answered \
             503 server_busy.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(cosignatures.clone()))?;
        registry.register(Box::new(recorded_size.clone()))?;
        registry.register(Box::new(body_bytes_held.clone()))?;
        for origin in origins {
            cosignatures.with_label_values(&[origin]);
            recorded_size.with_label_values(&[origin]);
        }
        Ok(WitnessMetrics {
            registry,
            requests,
            cosignatures,
            recorded_size,
            raising: std::sync::Mutex::new(()),
            body_bytes_held,
        })
    }

    /// Raises the recorded size's gauge to `size`, never lowers it: what a
    /// witness records never goes back, and a request that read the record
    /// before another one's cosignature may get here after it.
    fn recorded(&self, origin: &str, size: u64) {
        let _raising = self
            .raising
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gauge = self.recorded_size.with_label_values(&[origin]);
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        if size > gauge.get() {
            gauge.set(size);
        }
    }

    /// The metrics' text, with `body_bytes_held` (read when scraped).
    fn render(&self, body_bytes_held: usize) -> Result<String, prometheus::Error> {
        self.body_bytes_held
            .set(i64::try_from(body_bytes_held).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// A running witness's shared state.
#[derive(Debug)]
pub struct Witness {
    state: WitnessState,
    key: CosignerKey,
    signer: Signer,
    logs: Vec<WitnessedLog>,
    limits: Limits,
    rate_limiter: RateLimiter,
    /// `[limits] max_body_bytes_in_flight`: anyone may post here.
    bodies: crate::api::pipeline::BodyBudget,
    metrics: WitnessMetrics,
    draining: AtomicBool,
    /// Held by the readiness check for as long as it runs, so a hung HSM
    /// ties up one blocking thread, not one per probe.
    probe: Arc<tokio::sync::Mutex<()>>,
}

impl Witness {
    /// A witness named `name` signing with `signer`, recording in `state`,
    /// for `logs`.
    ///
    /// # Errors
    /// The key cannot be read, or the name is not a key name; the state
    /// cannot be read.
    pub fn new(
        name: &str,
        signer: Signer,
        state: WitnessState,
        logs: Vec<WitnessedLog>,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let key = CosignerKey::new(name, &signer.public_key()?)?;
        let origins: Vec<&str> = logs.iter().map(|l| l.origin.as_str()).collect();
        let metrics = WitnessMetrics::new(&origins)?;
        for origin in &origins {
            if let Some((size, _)) = state.recorded(origin)? {
                metrics.recorded(origin, size);
            }
        }
        Ok(Witness {
            state,
            key,
            signer,
            rate_limiter: RateLimiter::new(limits.rate_limit_per_second, limits.rate_limit_burst),
            bodies: crate::api::pipeline::BodyBudget::new(
                limits.max_body_bytes_in_flight,
                "limits.max_body_bytes_in_flight",
            ),
            logs,
            limits,
            metrics,
            draining: AtomicBool::new(false),
            probe: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The witness's cosigner key (its vkey is `to_string()`).
    pub fn key(&self) -> &CosignerKey {
        &self.key
    }

    /// From now on `/readyz` answers 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn trusted(&self, origin: &str) -> Vec<VerifierKey> {
        self.logs
            .iter()
            .filter(|l| l.origin == origin)
            .map(|l| l.key.clone())
            .collect()
    }

    /// Signs `message` with the witness key, and checks the signature
    /// against the key this witness publishes (read at start), as the log's
    /// signer checks its own: a key replaced under the label on the token
    /// would give cosignatures that verify under no key, each recorded as
    /// given. Refused, nothing is recorded (the state's transaction rolls
    /// back) and the answer is 503.
    fn sign_checked(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let signature = self.signer.sign(message)?;
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            self.key.public_key(),
        )
        .verify(message, &signature)
        .map_err(|_| HsmError::KeyReplaced(self.signer.label()))?;
        Ok(signature)
    }

    /// Runs `add-checkpoint` on `body` (blocking: SQLite and the HSM).
    fn add_checkpoint(&self, body: &[u8]) -> Response {
        let clock = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let outcome = self.state.add_checkpoint_weighing_forks(
            body,
            &|origin| self.trusted(origin),
            &self.key,
            &clock,
            |message| self.sign_checked(message),
        );
        let origin = std::str::from_utf8(body)
            .ok()
            .and_then(|b| b.split_once("\n\n"))
            .and_then(|(_, note)| note.split('\n').next())
            .unwrap_or_default();
        match outcome {
            Err(e) => {
                tracing::error!(error = %e, "witness state unavailable");
                ApiError::StoreUnavailable.into_response()
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot sign with the witness key");
                ApiError::HsmUnavailable.into_response()
            }
            Ok(Ok((outcome, fork))) => {
                match &outcome {
                    AddOutcome::Cosigned(_) => {
                        // Known origin: the label set stays the config's.
                        self.metrics.cosignatures.with_label_values(&[origin]).inc();
                        if let Ok(Some((size, _))) = self.state.recorded(origin) {
                            self.metrics.recorded(origin, size);
                        }
                        tracing::info!(origin, "cosigned");
                    }
                    // Signed by the log, at the recorded size, with another
                    // root: two roots the log signed for one size, evidence
                    // of a fork, kept in the log (the spec allows it). It
                    // is answered 422 when the client sent that size as its
                    // old size, 409 when it sent another, 400 when it sent
                    // one above the checkpoint's; decided in the state's
                    // transaction, so a request landing meanwhile cannot
                    // hide it.
                    _ if fork => self.evidence(origin, outcome.status(), body),
                    // A proof that does not verify is the client's: anyone
                    // can send the log's real checkpoint with a byte of its
                    // proof changed, so it proves nothing against the log.
                    AddOutcome::BadProof(_) => {
                        tracing::info!(origin, "refused a consistency proof that does not verify")
                    }
                    AddOutcome::NoTimestamp => tracing::error!(
                        origin,
                        "this host's clock reads 1970 or before and the state has given no \
                         timestamp: no cosignature (its timestamp would be 0)"
                    ),
                    _ => {}
                }
                answer(outcome)
            }
        }
    }
}

impl Witness {
    /// Logs a fork's evidence: the request less the signature lines of
    /// other keys than the log's (a note may carry up to 64 lines, and
    /// anyone may replay the evidence once it exists), each of the log's
    /// lines once.
    fn evidence(&self, origin: &str, status: u16, body: &[u8]) {
        tracing::warn!(
            origin,
            status,
            request = %evidence(origin, body),
            "refused a checkpoint the log signed: it contradicts what this witness cosigned"
        );
    }
}

/// An `add-checkpoint` body as fork evidence: all of it but the note's
/// signature lines, of which only those named `origin` (the log's), each
/// once.
fn evidence(origin: &str, body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let logs_line = format!("\u{2014} {origin} ");
    let (head, signatures) = body.rsplit_once("\n\n").unwrap_or((&body, ""));
    let mut kept: Vec<&str> = Vec::new();
    for line in signatures.lines() {
        if line.starts_with(&logs_line) && !kept.contains(&line) {
            kept.push(line);
        }
    }
    format!("{head}\n\n{}\n", kept.join("\n"))
}

/// The spec's answer for `outcome`.
fn answer(outcome: AddOutcome) -> Response {
    let status = StatusCode::from_u16(outcome.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let (content_type, body) = match outcome {
        AddOutcome::Cosigned(line) => ("text/plain; charset=utf-8", line),
        AddOutcome::Conflict { size } => (TLOG_SIZE_CONTENT_TYPE, format!("{size}\n")),
        AddOutcome::BadRequest(why) | AddOutcome::BadProof(why) => {
            ("text/plain; charset=utf-8", format!("{why}\n"))
        }
        AddOutcome::Forbidden => (
            "text/plain; charset=utf-8",
            "no signature by a key trusted for this origin verifies\n".into(),
        ),
        AddOutcome::UnknownOrigin => (
            "text/plain; charset=utf-8",
            "this witness does not witness that origin\n".into(),
        ),
        AddOutcome::NoTimestamp => (
            "text/plain; charset=utf-8",
            "this witness's clock reads 1970 or before: it gives no cosignature\n".into(),
        ),
    };
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Answers one request of the witness listener.
pub async fn handle(
    witness: Arc<Witness>,
    req: Request<Incoming>,
    remote: SocketAddr,
    activity: Arc<Activity>,
) -> Response {
    let (parts, body) = req.into_parts();
    let (mut response, unread) = if parts.uri.path() != ADD_CHECKPOINT_PATH {
        (ApiError::NotFound.into_response(), Some(body))
    } else if parts.method != Method::POST {
        let mut r = ApiError::MethodNotAllowed.into_response();
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        (r, Some(body))
    } else if let Err(retry_after) = witness.rate_limiter.check(
        &crate::api::ratelimit::peer_key(remote.ip()),
        Instant::now(),
    ) {
        (
            ApiError::RateLimited { retry_after }.into_response(),
            Some(body),
        )
    } else {
        match crate::api::pipeline::read_bounded_body(
            &parts.headers,
            body,
            witness.limits.max_body_bytes,
            witness.limits.body_read_timeout,
            &witness.bodies,
        )
        .await
        {
            Err((e, unread)) => (e.into_response(), unread),
            Ok(bytes) => {
                let w = witness.clone();
                let response = tokio::task::spawn_blocking(move || w.add_checkpoint(&bytes))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "add-checkpoint task failed");
                        ApiError::Internal.into_response()
                    });
                (response, None)
            }
        }
    };
    if let Some(body) = unread {
        server::linger(body, &activity, &mut response);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let status = response.status().as_u16().to_string();
    witness
        .metrics
        .requests
        .with_label_values(&[status.as_str()])
        .inc();
    tracing::info!(%remote, status = response.status().as_u16(), "add-checkpoint");
    response
}

/// `/readyz`'s answer.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WitnessReady {
    /// Every check passes and the witness is not stopping.
    pub ready: bool,
    /// The key can sign: the HSM has a logged-in session and holds it.
    pub key: bool,
    /// The state file answers.
    pub state: bool,
    /// The witness is shutting down.
    pub draining: bool,
}

/// The admin routes: `/healthz`, `/readyz`, `/metrics`.
pub fn admin_routes(witness: Arc<Witness>) -> warp::filters::BoxedFilter<(Response,)> {
    let ready = witness.clone();
    crate::api::admin::table(
        move || {
            let w = ready.clone();
            async move {
                let checked = async {
                    let guard = w.probe.clone().lock_owned().await;
                    let w = w.clone();
                    tokio::task::spawn_blocking(move || {
                        let _guard = guard;
                        let key = w.signer.ready(&w.key);
                        let state = w.state.check().is_ok();
                        let draining = w.draining.load(Ordering::SeqCst);
                        WitnessReady {
                            ready: key && state && !draining,
                            key,
                            state,
                            draining,
                        }
                    })
                    .await
                };
                // A hung HSM answers "not ready" rather than hanging the probe.
                let report = tokio::time::timeout(std::time::Duration::from_secs(5), checked)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(WitnessReady {
                        ready: false,
                        key: false,
                        state: false,
                        draining: false,
                    });
                (report.ready, serde_json::json!(report))
            }
        },
        move || witness.metrics.render(witness.bodies.held()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two requests that cosigned one after the other may set the gauge in
    /// the other order: it keeps the larger size (what a witness records
    /// never goes back).
    #[test]
    fn the_recorded_size_gauge_never_goes_back() {
        let metrics = WitnessMetrics::new(&["log.example/a"]).unwrap();
        metrics.recorded("log.example/a", 10);
        metrics.recorded("log.example/a", 5);
        let gauge = metrics.recorded_size.with_label_values(&["log.example/a"]);
        assert_eq!(gauge.get(), 10);
        metrics.recorded("log.example/a", 11);
        assert_eq!(gauge.get(), 11);
    }

    /// Fork evidence keeps the request's old size, proof and checkpoint
    /// and the log's signature lines, once each; other keys' lines (a note
    /// may carry 64) are left out of the log line.
    #[test]
    fn fork_evidence_keeps_the_checkpoint_and_the_logs_lines_only() {
        let log_line = "\u{2014} log.example/a AAAAAQ==";
        let other = "\u{2014} other.example/x BBBBBB==";
        let body = format!(
            "old 5\nproofline=\n\nlog.example/a\n7\nroot=\n\n{log_line}\n{other}\n{log_line}\n{other}\n"
        );
        assert_eq!(
            evidence("log.example/a", body.as_bytes()),
            format!("old 5\nproofline=\n\nlog.example/a\n7\nroot=\n\n{log_line}\n")
        );
    }
}
