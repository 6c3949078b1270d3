//! The operations endpoints (PROTOCOL §7), on their own plain-HTTP listener
//! (`[admin] listen`, default `127.0.0.1:9090`), without client
//! certificates: bind it to loopback or a management network.
//!
//! - `GET /healthz`: the process is alive (always 200).
//! - `GET /readyz`: 200 only when the HSM has a logged-in session and its
//!   token still finds the audit signing key, no HSM call is still running
//!   past its deadline (`[hsm] call_timeout_ms`), the store can take its write
//!   lock, the audit log is consistent with its last signed checkpoint (once
//!   it is not, it stays not ready until restarted) and has no leaves of HSM
//!   opens waiting to be written, and the server is not shutting down; 503
//!   otherwise. Checked on every call, so it turns false when a dependency
//!   fails and true again when it recovers, without a restart.
//! - `GET /metrics`: Prometheus text format.
//!
//! Replies say which check failed, never why: the reason (a `CKR_*` code, a
//! SQLite error, a path) goes to the log when readiness changes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use warp::filters::BoxedFilter;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::error;
use super::state::ServerState;

/// How long one readiness check may take before it counts as failing.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store check waits for another writer's lock.
const STORE_LOCK_WAIT: Duration = Duration::from_millis(500);

/// The readiness checks, with the serialisation that keeps a hung HSM from
/// tying up more than one blocking thread.
#[derive(Debug)]
pub struct Readiness {
    state: Arc<ServerState>,
    hsm_probe: Probe,
    store_probe: Probe,
    /// 0 unknown, 1 ready, 2 not ready: to log changes only.
    last: AtomicU8,
}

/// One readiness answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadyReport {
    /// All checks pass and the server is not draining.
    pub ready: bool,
    /// The HSM has a logged-in session and finds the audit key.
    pub hsm: bool,
    /// The store can take its write lock.
    pub store: bool,
    /// The audit log's stored tree extends its last signed checkpoint, and
    /// no leaves of HSM opens wait to be written.
    pub log: bool,
    /// The server is shutting down.
    pub draining: bool,
}

impl Readiness {
    /// Checks for `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Readiness {
            state,
            hsm_probe: Probe::default(),
            store_probe: Probe::default(),
            last: AtomicU8::new(0),
        }
    }

    /// Runs the checks now.
    pub async fn check(&self) -> ReadyReport {
        let (hsm, store) = tokio::join!(self.check_hsm(), self.check_store());
        let draining = self.state.is_draining();
        // Consistent, and holding every HSM open: leaves still waiting to
        // be written ([`crate::audit::log::AuditLog::append_later`]) mean
        // the daemon opens nothing.
        let waiting = self.state.audit.deferred_leaves();
        let log = self.state.audit.inconsistency().is_none() && waiting == 0;
        let report = ReadyReport {
            ready: hsm.is_ok() && store.is_ok() && log && !draining,
            hsm: hsm.is_ok(),
            store: store.is_ok(),
            log,
            draining,
        };
        let now = if report.ready { 1 } else { 2 };
        if self.last.swap(now, Ordering::SeqCst) != now {
            if report.ready {
                tracing::info!("ready");
            } else {
                tracing::warn!(
                    hsm = hsm.err().as_deref().unwrap_or("ok"),
                    store = store.err().as_deref().unwrap_or("ok"),
                    log = self.state.audit.inconsistency().unwrap_or("ok"),
                    deferred_leaves = waiting,
                    draining,
                    "not ready"
                );
            }
        }
        report
    }

    async fn check_hsm(&self) -> Result<(), String> {
        let stuck = self.state.hsm.stuck_calls();
        if stuck > 0 {
            // The module holds calls it has not answered: the probe's own
            // call would most likely hang with them.
            return Err(format!(
                "{stuck} HSM calls have not returned within {} ms",
                self.state.hsm.call_timeout().as_millis()
            ));
        }
        let hsm = self.state.hsm.clone();
        let audit = self.state.audit.clone();
        let probe = self.hsm_probe.clone();
        let asked = std::time::Instant::now();
        bounded(async move {
            // The guard moves into the blocking task, so a hung HSM holds it
            // and later probes time out waiting instead of piling up threads.
            let mut guard = probe.lock_owned().await;
            if let Some(answer) = answered_since(&guard, asked) {
                return answer;
            }
            hsm.run(move |h| {
                let started = std::time::Instant::now();
                let ready = h.check_ready(|_| audit.key_on_token());
                *guard = Some((started, ready.clone()));
                drop(guard);
                Ok(ready)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|ready| ready)
        })
        .await
    }

    async fn check_store(&self) -> Result<(), String> {
        let store = self.state.store.clone();
        let probe = self.store_probe.clone();
        let asked = std::time::Instant::now();
        bounded(async move {
            let mut guard = probe.lock_owned().await;
            if let Some(answer) = answered_since(&guard, asked) {
                return answer;
            }
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let r = store
                    .check_writable(STORE_LOCK_WAIT)
                    .map_err(|e| e.to_string());
                *guard = Some((started, r.clone()));
                drop(guard);
                r
            })
            .await
            .map_err(|e| e.to_string())?
        })
        .await
    }
}

/// One check's lock, held while it runs, with its last answer and when
/// that probe started: probes run one at a time, and one that waited for
/// another is answered by it when it started after the waiting one was
/// asked (many `/readyz` at once behind a slow HSM are one probe, or two,
/// not a queue whose last waits past the check's timeout and answers 503;
/// no call is answered from a look taken before it was made).
type Probe = Arc<tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>>;

/// The answer of a probe that started after `asked`, if the last one did.
fn answered_since(
    last: &Option<(std::time::Instant, Result<(), String>)>,
    asked: std::time::Instant,
) -> Option<Result<(), String>> {
    last.as_ref()
        .filter(|(started, _)| *started >= asked)
        .map(|(_, answer)| answer.clone())
}

async fn bounded(
    check: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))
}

/// The admin listener's routes, as (method, path); `docs/openapi.yaml` lists
/// them too.
pub const ADMIN_ROUTES: &[(&str, &str)] =
    &[("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")];

/// The admin route table.
pub fn routes(readiness: Arc<Readiness>) -> BoxedFilter<(Response,)> {
    let metrics = readiness.state.metrics.clone();
    let store = readiness.state.store.clone();
    let hsm = readiness.state.hsm.clone();
    let state = readiness.state.clone();
    table(
        move || {
            let readiness = readiness.clone();
            async move {
                let report = readiness.check().await;
                (report.ready, serde_json::json!(report))
            }
        },
        move || {
            metrics.render_with(crate::metrics::Scraped {
                store_retries: store.retries(),
                hsm_calls_stuck: hsm.stuck_calls(),
                hsm_call_timeouts: hsm.timed_out_calls(),
                request_body_bytes_held: state.bodies.held()
                    + state.revocation_bodies.held()
                    + state.admin_revocation_bodies.held(),
            })
        },
    )
}

/// An admin listener's routes: `/healthz` (always 200), `/readyz` (the
/// JSON report `ready` makes; 200 when it says ready, else 503) and
/// `/metrics` (what `render` makes). `lavd serve` and `lavd witness serve`
/// share it.
pub fn table<R, F, M>(ready: R, render: M) -> BoxedFilter<(Response,)>
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = (bool, serde_json::Value)> + Send,
    M: Fn() -> Result<String, prometheus::Error> + Clone + Send + Sync + 'static,
{
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"alive": true})).into_response());
    let readyz = warp::path!("readyz").and(warp::get()).then(move || {
        let ready = ready.clone();
        async move {
            let (ok, report) = ready().await;
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            warp::reply::with_status(warp::reply::json(&report), status).into_response()
        }
    });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .map(move || metrics_response(render()));
    healthz
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(error::recover)
        .unify()
        .map(|mut response: Response| {
            // Every admin route is a GET: a wrong method is told so, as on
            // the API (RFC 9110 §15.5.6).
            if response.status() == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            response
        })
        .boxed()
}

/// `/metrics`' answer: the Prometheus text format, or a bare 500.
fn metrics_response(rendered: Result<String, prometheus::Error>) -> Response {
    match rendered {
        Ok(text) => {
            let mut r = Response::new(text.into());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot render metrics");
            error::ApiError::Internal.into_response()
        }
    }
}
