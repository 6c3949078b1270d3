//! The route table of `/v1` and the filters every route is built from.
//!
//! A route is: path → method → [`route`] (names it for metrics and logs) →
//! [`require`] (role check, yields the caller's [`PeerIdentity`]) → inputs
//! ([`json_body`], [`with_state`]) → an async handler returning
//! `Result<impl Reply, Rejection>` whose errors are [`ApiError`]s (use `?`:
//! `ApiError` converts into a rejection). Path comes before method so that an
//! unknown path is 404 rather than 405.
//!
//! By the time a request gets here the pipeline has checked the client
//! certificate's identity, applied the rate limit and read the whole body
//! within `limits.max_body_bytes`.
//!
//! Adding a route (in [`routes`], then `.or(it).unify()` into the table):
//!
//! ```text
//! let unwrap = warp::path!("v1" / "unwrap")
//!     .and(warp::post())
//!     .and(route("/v1/unwrap"))
//!     .and(require(&[Role::Agency]))
//!     .and(raw_body())                       // or json_body::<UnwrapRequest>()
//!     .and(context())                        // to record the warrant id
//!     .and(with_state(state.clone()))
//!     .and_then(unwrap_handler);
//!
//! async fn unwrap_handler(peer: PeerIdentity, body: Bytes, ctx: Arc<RequestContext>,
//!                         state: Arc<ServerState>) -> Result<Response, Rejection> {
//!     let request = parse(&body).map_err(|e| ApiError::Malformed(e.to_string()))?;
//!     if request.envelopes.len() > state.limits.max_batch { return Err(ApiError::BatchTooLarge { … }.into()) }
//!     ctx.record_warrant_id(&request.warrant_id);
//!     let opened = state.hsm.run(move |hsm| …).await;  // never hold a session across .await
//!     state.metrics.envelope("ok");
//!     Ok(warp::reply::json(&reply).into_response())
//! }
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::error::{self, ApiError};
use super::handlers;
use super::identity::{PeerIdentity, Role};
use super::pipeline::{Admitted, Readmission};
use super::state::{Reloadable, ServerState};

/// Per-request context the pipeline puts in the request's extensions, next
/// to the [`PeerIdentity`].
#[derive(Debug)]
pub struct RequestContext {
    span: tracing::Span,
    route: OnceLock<&'static str>,
}

impl RequestContext {
    pub(crate) fn new(span: tracing::Span) -> Self {
        RequestContext {
            span,
            route: OnceLock::new(),
        }
    }

    /// Records the warrant id in the request's log span (not in metrics).
    /// Call it once the warrant has been parsed, so refused requests are
    /// traceable too.
    pub fn record_warrant_id(&self, id: &str) {
        self.span.record("warrant_id", id);
    }

    /// The request's span, to enter from blocking code.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The matched route template, if any route matched path and method.
    pub fn route(&self) -> Option<&'static str> {
        self.route.get().copied()
    }

    fn set_route(&self, template: &'static str) {
        if self.route.set(template).is_ok() {
            self.span.record("route", template);
        }
    }
}

/// Every `/v1` route, as (method, template). `docs/openapi.yaml` must list
/// exactly these (`softhsm-tests/tests/openapi_routes.rs`), and [`route`]
/// refuses (in debug builds, so in every test) a template missing here.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/keys"),
    ("POST", "/v1/unwrap"),
    ("POST", REVOCATIONS),
    ("GET", "/v1/audit/key"),
    ("GET", "/v1/audit/checkpoint"),
    ("GET", "/v1/audit/entries"),
    ("GET", "/v1/audit/proof/inclusion"),
    ("GET", "/v1/audit/proof/consistency"),
    ("GET", "/v1/log/checkpoint"),
    ("GET", "/v1/log/tile/{L}/{N}"),
    ("GET", "/v1/log/tile/entries/{N}"),
];

/// `POST /v1/warrants/revocations`, whose bodies the pipeline counts
/// against a budget of their own.
pub const REVOCATIONS: &str = "/v1/warrants/revocations";

/// Who may reach `POST /v1/unwrap`.
pub const UNWRAP_ROLES: &[Role] = &[Role::Agency];

/// The routes that take a request body (the `POST`s of [`ROUTES`]), with the
/// roles that may reach each ([`ANY_ROLE`]: any role). The pipeline reads a
/// body only for a request one of them may take: a caller that may reach
/// none is answered (403 `forbidden`, 404) without waiting for a body it
/// could hold in memory for the whole `body_read_timeout`.
pub const BODY_ROUTES: &[(&str, &[Role])] =
    &[("/v1/unwrap", UNWRAP_ROLES), (REVOCATIONS, ANY_ROLE)];

/// Whether a request with this method and path, from a caller holding
/// `roles`, reaches a route of [`BODY_ROUTES`].
pub fn takes_body(
    method: &warp::http::Method,
    path: &str,
    roles: &std::collections::BTreeSet<Role>,
) -> bool {
    method == warp::http::Method::POST
        && BODY_ROUTES
            .iter()
            .any(|(template, allowed)| *template == path && roles_allow(allowed, roles))
}

/// Whether a caller holding `held` may do what needs one of `allowed`
/// ([`ANY_ROLE`], no role named: any role at all). The one rule for every
/// route's check, a body's, and a request's readmission.
pub fn roles_allow(allowed: &[Role], held: &std::collections::BTreeSet<Role>) -> bool {
    if allowed.is_empty() {
        !held.is_empty()
    } else {
        allowed.iter().any(|r| held.contains(r))
    }
}

/// Names the route (its template, e.g. `/v1/audit/proof/inclusion`) for the
/// request metrics and the log span. Put it right after path and method.
pub fn route(
    template: &'static str,
) -> impl Filter<Extract = (), Error = std::convert::Infallible> + Clone {
    debug_assert!(
        ROUTES.iter().any(|(_, t)| *t == template),
        "route {template} is not in api::routes::ROUTES (and docs/openapi.yaml)"
    );
    warp::ext::optional::<Arc<RequestContext>>()
        .map(move |ctx: Option<Arc<RequestContext>>| {
            if let Some(ctx) = ctx {
                ctx.set_route(template);
            }
        })
        .untuple_one()
}

/// Lets the request through only if the caller holds one of `roles`, and
/// yields its [`PeerIdentity`]. With an empty slice, any role will do (but an
/// identity with no role at all is still refused).
///
/// # Errors
/// Rejects with [`ApiError::Forbidden`] (403 `forbidden`).
pub fn require(
    roles: &'static [Role],
) -> impl Filter<Extract = (PeerIdentity,), Error = Rejection> + Clone {
    warp::ext::optional::<PeerIdentity>().and_then(move |peer: Option<PeerIdentity>| async move {
        // The pipeline always inserts the identity; its absence is a bug,
        // and it fails closed.
        let peer = peer.ok_or(ApiError::Internal)?;
        if roles_allow(roles, peer.roles()) {
            Ok(peer)
        } else {
            Err(Rejection::from(ApiError::forbidden(peer.uri(), roles)))
        }
    })
}

/// The configuration the pipeline admitted the request under, so that the
/// caller's roles and the handler's trust (authorities, policy) come from
/// one snapshot.
pub fn admitted() -> impl Filter<Extract = (Arc<Reloadable>,), Error = Rejection> + Clone {
    warp::ext::optional::<Admitted>().and_then(|admitted: Option<Admitted>| async move {
        // The pipeline always inserts it; its absence is a bug, and it
        // fails closed.
        admitted
            .map(|a| a.0)
            .ok_or_else(|| Rejection::from(ApiError::Internal))
    })
}

/// The request's [`Readmission`] (mutual-TLS listeners only).
pub(crate) fn readmission() -> impl Filter<Extract = (Readmission,), Error = Rejection> + Clone {
    warp::ext::optional::<Readmission>().and_then(|r: Option<Readmission>| async move {
        // The pipeline inserts it on the API listener; its absence is a
        // bug, and it fails closed.
        r.ok_or_else(|| Rejection::from(ApiError::Internal))
    })
}

/// Any role at all (`GET /v1/keys`).
pub const ANY_ROLE: &[Role] = &[];

/// The request's [`RequestContext`].
pub fn context() -> impl Filter<Extract = (Arc<RequestContext>,), Error = Rejection> + Clone {
    warp::ext::optional::<Arc<RequestContext>>().and_then(
        |ctx: Option<Arc<RequestContext>>| async move {
            ctx.ok_or_else(|| Rejection::from(ApiError::Internal))
        },
    )
}

/// The body as `T`, parsed strictly ([`crate::codec::from_json`]: unknown
/// and duplicate fields and trailing data are refused; `T` must use
/// `deny_unknown_fields`).
///
/// # Errors
/// Rejects with [`ApiError::Malformed`] (400 `malformed_request`), naming
/// what serde found wrong.
pub fn json_body<T: DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    raw_body().and_then(|bytes: warp::hyper::body::Bytes| async move {
        crate::codec::from_json::<T>(&bytes).map_err(|e| {
            Rejection::from(ApiError::Malformed(match e {
                crate::codec::CodecError::Json(m) => format!("body: {m}"),
                other => format!("body: {other}"),
            }))
        })
    })
}

/// The body's exact bytes (already bounded by `limits.max_body_bytes`), for
/// handlers that must keep them as sent; only a body sent as
/// `application/json` ([`ApiError::UnsupportedMediaType`], 415, otherwise).
pub fn raw_body() -> impl Filter<Extract = (warp::hyper::body::Bytes,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(|headers: warp::http::HeaderMap| async move {
            let mut sent = headers.get_all(warp::http::header::CONTENT_TYPE).iter();
            let refused = |why: String| Err(Rejection::from(ApiError::UnsupportedMediaType(why)));
            match (sent.next(), sent.next()) {
                (None, _) => refused("no content-type".into()),
                // Which one a proxy or a parser would take is anyone's guess.
                (Some(_), Some(_)) => refused("two content-type headers".into()),
                (Some(value), None) => match value.to_str() {
                    Ok(t) if is_json(t) => Ok(()),
                    Ok(t) => refused(format!("{:?}", t.chars().take(100).collect::<String>())),
                    Err(_) => refused("a content-type that is not visible ASCII".into()),
                },
            }
        })
        .untuple_one()
        .and(warp::body::bytes())
}

/// Whether a `content-type` value names JSON as lavd reads it:
/// `application/json`, in any case, with or without parameters, but with no
/// `charset` other than UTF-8 (RFC 8259 §8.1: JSON between systems is UTF-8;
/// a body declared UTF-16 would be read as something it is not).
fn is_json(content_type: &str) -> bool {
    let mut parts = content_type.split(';');
    let json = parts
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    json && parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    })
}

/// The numeric query parameters of a route (`?start=&end=`, `?index=&size=`,
/// `?from=&to=`): leaf indexes and tree sizes, each checked here against the
/// one bound the store can represent ([`crate::store::MAX_INDEX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexQuery(std::collections::BTreeMap<&'static str, u64>);

impl IndexQuery {
    /// A required parameter (the parser made sure it is present).
    ///
    /// # Errors
    /// [`ApiError::Internal`] if `name` was not declared required: a bug.
    pub fn required(&self, name: &str) -> Result<u64, ApiError> {
        self.0.get(name).copied().ok_or(ApiError::Internal)
    }

    /// An optional parameter.
    pub fn optional(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// Parses a raw query string. Each parameter is a decimal integer from 0
    /// to [`crate::store::MAX_INDEX`] written with ASCII digits only; every
    /// name in `required` must be present, no name outside `required` and
    /// `optional` may appear, and none twice.
    ///
    /// # Errors
    /// [`ApiError::Malformed`] naming the parameter and what is wrong.
    pub fn parse(
        raw: &str,
        required: &[&'static str],
        optional: &[&'static str],
    ) -> Result<Self, ApiError> {
        let mut values = std::collections::BTreeMap::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(known) = required.iter().chain(optional).find(|n| **n == name) else {
                return Err(ApiError::Malformed(format!(
                    "unknown query parameter `{}`",
                    name.chars().take(32).collect::<String>().escape_debug()
                )));
            };
            let number = parse_index(value).ok_or_else(|| {
                ApiError::Malformed(format!(
                    "query parameter `{known}` must be an integer from 0 to {}, without leading zeros",
                    crate::store::MAX_INDEX
                ))
            })?;
            if values.insert(*known, number).is_some() {
                return Err(ApiError::Malformed(format!(
                    "query parameter `{known}` is given twice"
                )));
            }
        }
        if let Some(missing) = required.iter().find(|n| !values.contains_key(*n)) {
            return Err(ApiError::Malformed(format!(
                "query parameter `{missing}` is required"
            )));
        }
        Ok(IndexQuery(values))
    }
}

/// A leaf index or tree size: ASCII digits without leading zeros (one
/// spelling per value, as in tile paths), at most
/// [`crate::store::MAX_INDEX`].
fn parse_index(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    text.parse::<u64>()
        .ok()
        .filter(|n| *n <= crate::store::MAX_INDEX)
}

/// The route's [`IndexQuery`]: `required` and `optional` name its numeric
/// query parameters.
///
/// # Errors
/// Rejects with [`ApiError::Malformed`] (400 `malformed_request`).
pub fn index_query(
    required: &'static [&'static str],
    optional: &'static [&'static str],
) -> impl Filter<Extract = (IndexQuery,), Error = Rejection> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .and_then(move |raw: String| async move {
            IndexQuery::parse(&raw, required, optional).map_err(Rejection::from)
        })
}

/// Refuses any query string on a route that takes none (400
/// `malformed_request`), as the routes that take some refuse unknown
/// parameters: `GET /v1/keys?kid=…` must not look like a filter that
/// worked.
pub fn no_query() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .and_then(|raw: String| async move {
            if raw.is_empty() {
                Ok(())
            } else {
                Err(Rejection::from(ApiError::Malformed(format!(
                    "this endpoint takes no query parameters; got {:?}",
                    raw.chars().take(100).collect::<String>()
                ))))
            }
        })
        .untuple_one()
}

/// Requests' work on the blocking pool that has not returned, process-wide
/// ([`blocking`]), with the condition [`wait_for_request_work`] waits on.
pub static REQUEST_WORK: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// One piece of work's place in [`REQUEST_WORK`], given back on drop.
struct RequestWork;

impl RequestWork {
    fn enter() -> Self {
        *REQUEST_WORK
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        RequestWork
    }
}

impl Drop for RequestWork {
    fn drop(&mut self) {
        let mut running = REQUEST_WORK
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *running -= 1;
        if *running == 0 {
            REQUEST_WORK.1.notify_all();
        }
    }
}

/// Waits until no request work runs on the blocking pool, calling
/// `still(running, waited)` every `every` meanwhile. Blocking. There is no
/// bound: an unwrap's HSM calls give up at the call deadline, and what its
/// store does is bounded by the store's own timeouts; the service
/// manager's stop timeout bounds the rest.
pub fn wait_for_request_work(every: Duration, mut still: impl FnMut(usize, Duration)) {
    let started = std::time::Instant::now();
    let mut running = REQUEST_WORK
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while *running > 0 {
        let (next, timeout) = REQUEST_WORK
            .1
            .wait_timeout(running, every)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running = next;
        if timeout.timed_out() && *running > 0 {
            still(*running, started.elapsed());
        }
    }
}

/// Hands the shared state to a handler.
pub fn with_state(
    state: Arc<ServerState>,
) -> impl Filter<Extract = (Arc<ServerState>,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// Runs blocking work (store, HSM through [`crate::hsm::Hsm`]'s sync API)
/// on the blocking pool, inside the request's span. The work is counted
/// in [`REQUEST_WORK`] until it returns, even when the request that waited
/// for it is gone (its connection cut at the end of the drain): the stop
/// waits for it, so that an unwrap whose HSM opens ran logs them.
///
/// # Errors
/// `f`'s error, or [`ApiError::Internal`] if the task panicked.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let span = tracing::Span::current();
    let counted = RequestWork::enter();
    tokio::task::spawn_blocking(move || {
        let _counted = counted;
        span.in_scope(f)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "blocking task failed");
        ApiError::Internal
    })?
}

/// Most revocations running at once on threads of their own
/// ([`off_the_pool`]); more wait for one of them to finish.
pub const OWN_THREADS: usize = 16;

/// As [`blocking`], but on a thread of its own (at most [`OWN_THREADS`] at
/// once), not on the blocking pool: for a revocation, which must not wait
/// behind unwraps. An unwrap waiting for its turn at the envelope gate
/// holds a blocking-pool thread; with `server.blocking_threads` of them
/// waiting, anything else sent to the pool queues behind them, and a
/// revocation would then take effect when the agency it cuts off lets it.
///
/// # Errors
/// `f`'s error, or [`ApiError::Internal`] if no thread could be started or
/// `f` panicked.
pub async fn off_the_pool<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    static THREADS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(OWN_THREADS);
    // Held by the thread, not by this future: a request dropped while its
    // thread runs (its connection cut) does not free a place for another.
    let thread = THREADS.acquire().await.map_err(|e| {
        tracing::error!(error = %e, "no thread for the request");
        ApiError::Internal
    })?;
    let span = tracing::Span::current();
    let counted = RequestWork::enter();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lavd-own".into())
        .spawn(move || {
            let _thread = thread;
            let _counted = counted;
            let _ = done.send(span.in_scope(f));
        })
        .map_err(|e| {
            tracing::error!(error = %e, "cannot start a thread for the request");
            ApiError::Internal
        })?;
    result.await.map_err(|_| {
        tracing::error!("the request's thread panicked");
        ApiError::Internal
    })?
}

/// The `/v1` route table. Every response, success or refusal, comes out
/// of here as a [`Response`]; refusals have the PROTOCOL error shape.
pub fn routes(state: Arc<ServerState>) -> BoxedFilter<(Response,)> {
    // GET /v1/keys: the escrow public keys (PROTOCOL §2), for any role.
    let keys = warp::path!("v1" / "keys")
        .and(warp::get())
        .and(route("/v1/keys"))
        .and(require(ANY_ROLE))
        .and(no_query())
        .and(with_state(state.clone()))
        .and_then(get_keys);

    let unwrap = warp::path!("v1" / "unwrap")
        .and(warp::post())
        .and(route("/v1/unwrap"))
        .and(require(UNWRAP_ROLES))
        .and(no_query())
        .and(admitted())
        .and(readmission())
        .and(raw_body())
        .and(context())
        .and(with_state(state.clone()))
        .and_then(handlers::post_unwrap);
    // Admin, or any caller delivering an authority-signed revocation: the
    // handler decides which once it has seen the body.
    let revocations = warp::path!("v1" / "warrants" / "revocations")
        .and(warp::post())
        .and(route(REVOCATIONS))
        .and(require(ANY_ROLE))
        .and(no_query())
        .and(admitted())
        .and(readmission())
        .and(raw_body())
        .and(with_state(state.clone()))
        .and_then(handlers::post_revocation);
    let auditor = || require(&[Role::Auditor]);
    let audit_key = warp::path!("v1" / "audit" / "key")
        .and(warp::get())
        .and(route("/v1/audit/key"))
        .and(auditor())
        .and(no_query())
        .and(with_state(state.clone()))
        .and_then(handlers::audit_key);
    let audit_checkpoint = warp::path!("v1" / "audit" / "checkpoint")
        .and(warp::get())
        .and(route("/v1/audit/checkpoint"))
        .and(auditor())
        .and(no_query())
        .and(with_state(state.clone()))
        .and_then(handlers::audit_checkpoint);
    let audit_entries = warp::path!("v1" / "audit" / "entries")
        .and(warp::get())
        .and(route("/v1/audit/entries"))
        .and(auditor())
        .and(index_query(&["start"], &["end"]))
        .and(with_state(state.clone()))
        .and_then(handlers::audit_entries);
    let audit_inclusion = warp::path!("v1" / "audit" / "proof" / "inclusion")
        .and(warp::get())
        .and(route("/v1/audit/proof/inclusion"))
        .and(auditor())
        .and(index_query(&["index", "size"], &[]))
        .and(with_state(state.clone()))
        .and_then(handlers::audit_inclusion);
    let audit_consistency = warp::path!("v1" / "audit" / "proof" / "consistency")
        .and(warp::get())
        .and(route("/v1/audit/proof/consistency"))
        .and(auditor())
        .and(index_query(&["from", "to"], &[]))
        .and(with_state(state.clone()))
        .and_then(handlers::audit_consistency);

    keys.or(unwrap)
        .unify()
        .or(revocations)
        .unify()
        .or(audit_key)
        .unify()
        .or(audit_checkpoint)
        .unify()
        .or(audit_entries)
        .unify()
        .or(audit_inclusion)
        .unify()
        .or(audit_consistency)
        .unify()
        .or(log_routes(state, auditor(), handlers::Signing::IfGrown))
        .unify()
        .recover(error::recover)
        .unify()
        .boxed()
}

/// The routes of the public log listener (`[audit.public]`): the same
/// read-only `/v1/log/` paths, open to anyone the listener admits.
pub fn public_routes(state: Arc<ServerState>) -> BoxedFilter<(Response,)> {
    let anyone =
        warp::ext::optional::<PeerIdentity>().and_then(|peer: Option<PeerIdentity>| async move {
            // The pipeline always inserts the (role-less) caller; its absence is
            // a bug, and it fails closed.
            peer.ok_or_else(|| Rejection::from(ApiError::Internal))
        });
    log_routes(state, anyone, handlers::Signing::Never)
        .recover(error::recover)
        .unify()
        .map(shared_cache)
        .boxed()
}

/// On the public listener the log is the same for everyone, so shared caches
/// (a CDN in front of an oversight body's mirror) may keep what the auditor
/// routes mark `private`.
fn shared_cache(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if let Some(value) = headers.get(warp::http::header::CACHE_CONTROL) {
        if let Some(rest) = value.to_str().ok().and_then(|v| v.strip_prefix("private")) {
            if let Ok(public) = warp::http::HeaderValue::from_str(&format!("public{rest}")) {
                headers.insert(warp::http::header::CACHE_CONTROL, public);
            }
        }
    }
    response
}

/// The log as C2SP tlog-tiles (PROTOCOL §8), for callers `guard` admits:
/// `{N}` is the tile index in `x001/x234/067` form, optionally followed by
/// `.p/<W>`.
fn log_routes<G>(
    state: Arc<ServerState>,
    guard: G,
    signing: handlers::Signing,
) -> BoxedFilter<(Response,)>
where
    G: Filter<Extract = (PeerIdentity,), Error = Rejection> + Clone + Send + Sync + 'static,
{
    let log_checkpoint = warp::path!("v1" / "log" / "checkpoint")
        .and(warp::get())
        .and(route("/v1/log/checkpoint"))
        .and(guard.clone())
        .and(no_query())
        .and(with_state(state.clone()))
        .and(warp::any().map(move || signing))
        .and_then(handlers::log_checkpoint);
    let log_entries = warp::path!("v1" / "log" / "tile" / "entries" / ..)
        .and(warp::path::tail())
        .and(warp::get())
        .and(route("/v1/log/tile/entries/{N}"))
        .and(guard.clone())
        .and(no_query())
        .and(with_state(state.clone()))
        .and_then(|tail: warp::path::Tail, _peer: PeerIdentity, state| {
            handlers::log_tile(format!("entries/{}", tail.as_str()), state)
        });
    let log_tile = warp::path!("v1" / "log" / "tile" / ..)
        .and(warp::path::tail())
        // `entries/…` is `log_entries`' alone: were it to fall through to
        // here when that handler refuses (404, 503), the same request would
        // run, and read the store, twice. A `not_found` rejection yields to
        // the handler's own in warp's combination.
        .and_then(|tail: warp::path::Tail| async move {
            if tail.as_str().starts_with("entries/") {
                Err(warp::reject::not_found())
            } else {
                Ok(tail)
            }
        })
        .and(warp::get())
        .and(route("/v1/log/tile/{L}/{N}"))
        .and(guard)
        .and(no_query())
        .and(with_state(state))
        .and_then(|tail: warp::path::Tail, _peer: PeerIdentity, state| {
            handlers::log_tile(tail.as_str().to_string(), state)
        });
    log_checkpoint
        .or(log_entries)
        .unify()
        .or(log_tile)
        .unify()
        .boxed()
}

async fn get_keys(_peer: PeerIdentity, state: Arc<ServerState>) -> Result<Response, Rejection> {
    let st = state.clone();
    let set = blocking(move || {
        // A token that lost its objects finds no escrow key: that is an
        // unavailable HSM, not an empty key set.
        st.audit.key_on_token().map_err(|e| {
            tracing::error!(error = %e, "the token is not usable");
            ApiError::HsmUnavailable
        })?;
        crate::keys::jwks_checked(&st.hsm, st.store.as_ref(), time::OffsetDateTime::now_utc())
            .map_err(|e| {
                tracing::error!(error = %e, "cannot list escrow keys");
                match e {
                    crate::keys::KeyError::Store(_) => ApiError::StoreUnavailable,
                    _ => ApiError::HsmUnavailable,
                }
            })
    })
    .await?;
    Ok(warp::reply::json(&set).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON, with or without parameters, in UTF-8 only.
    #[test]
    fn a_json_content_type_is_utf_8() {
        for taken in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/json; profile=x",
            "application/json; charset=utf8",
        ] {
            assert!(is_json(taken), "{taken}");
        }
        for refused in [
            "application/json; charset=utf-16",
            "application/json; charset=latin1",
            "application/json; charset=",
            "application/jsonx",
            "text/json",
        ] {
            assert!(!is_json(refused), "{refused}");
        }
    }

    /// The routes that read a body are exactly the `POST`s of the table.
    #[test]
    fn the_body_routes_are_the_posts() {
        let posts: Vec<&str> = ROUTES
            .iter()
            .filter(|(method, _)| *method == "POST")
            .map(|(_, template)| *template)
            .collect();
        let bodies: Vec<&str> = BODY_ROUTES.iter().map(|(template, _)| *template).collect();
        assert_eq!(posts, bodies);
        let post = warp::http::Method::POST;
        let agency = std::collections::BTreeSet::from([Role::Agency]);
        let provider = std::collections::BTreeSet::from([Role::Provider]);
        let none = std::collections::BTreeSet::new();
        assert!(takes_body(&post, "/v1/unwrap", &agency));
        assert!(!takes_body(&post, "/v1/unwrap", &provider));
        assert!(takes_body(&post, "/v1/warrants/revocations", &provider));
        assert!(!takes_body(&post, "/v1/warrants/revocations", &none));
        assert!(!takes_body(&warp::http::Method::PUT, "/v1/unwrap", &agency));
        assert!(!takes_body(&post, "/v1/keys", &agency));
    }

    fn refused(raw: &str) -> String {
        match IndexQuery::parse(raw, &["start"], &["end"]) {
            Err(ApiError::Malformed(m)) => m,
            other => panic!("{raw}: expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn index_query_takes_the_store_bound() {
        let q = IndexQuery::parse("start=9223372036854775807&end=5", &["start"], &["end"]).unwrap();
        assert_eq!(q.required("start").unwrap(), crate::store::MAX_INDEX);
        assert_eq!(q.optional("end"), Some(5));
        assert_eq!(
            IndexQuery::parse("start=0", &["start"], &["end"])
                .unwrap()
                .optional("end"),
            None
        );
        for raw in [
            "start=9223372036854775808",
            "start=18446744073709551615",
            "start=18446744073709551616",
            "start=-1",
            "start=+1",
            "start=1e3",
            "start=",
            "start",
            "start=%31",
            "start=0&end=9223372036854775808",
        ] {
            assert!(
                refused(raw).contains("integer from 0 to 9223372036854775807"),
                "{raw}"
            );
        }
        // One spelling per value, as in tile paths.
        for raw in ["start=00", "start=01", "start=1&end=007"] {
            assert!(refused(raw).contains("without leading zeros"), "{raw}");
        }
        assert_eq!(
            IndexQuery::parse("start=0&end=10", &["start"], &["end"]).unwrap(),
            IndexQuery([("start", 0), ("end", 10)].into_iter().collect())
        );
        assert!(refused("").contains("`start` is required"));
        assert!(refused("start=1&start=2").contains("twice"));
        assert!(refused("start=1&colour=red").contains("unknown"));
    }
}
