//! What every API request goes through before and after its route, in
//! order: identity of the connection → a token in the identity's rate
//! limit, looked for (a request over the limit costs no certificate work)
//! → the certificate still passes the current CAs and CRLs (checked in
//! full again only after a reload, or once the chain's earliest `notAfter`
//! or a CRL's `nextUpdate` is reached: [`ConnInfo`]) → the token taken (a
//! refused certificate spends none of its identity's) → body read within
//! `max_body_bytes` and `body_read_timeout` → the route table → metrics and
//! the request log line. On the public log listener ([`Access::Public`])
//! the first three steps are one: a rate limit per IPv4 address or IPv6
//! /64.
//!
//! Each request runs in a `request` span carrying the caller identity, the
//! remote address, the route template and (recorded by the unwrap handler)
//! the warrant id. Bodies are never logged.
//!
//! A request answered before its body was read whole (refused identity, rate
//! limit, body too large or too slow) hands the unread body to
//! [`server::linger`], which drains it within fixed bounds before the
//! connection closes, so that the client reads the answer instead of a reset.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Buf as _, Bytes};
use rustls::pki_types::{CertificateDer, UnixTime};
use tracing::Instrument as _;
use warp::http::{header, HeaderValue, Request};
use warp::reply::Response;

use super::error::{ApiError, ErrorCode};
use super::identity::{IdentityError, PeerIdentity, Role};
use super::ratelimit::LineThrottle;
use super::routes::RequestContext;
use super::server::{self, Activity};
use super::state::Reloadable;
use super::state::ServerState;

/// Route label of requests refused before routing (identity, rate limit,
/// body size).
pub const UNROUTED: &str = "unrouted";
/// Route label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The routes as a callable: request in, response out.
pub type Router = Arc<
    dyn Fn(
            Request<Full<Bytes>>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
        + Send
        + Sync,
>;

/// Turns a warp filter into a [`Router`].
pub fn router(filter: warp::filters::BoxedFilter<(Response,)>) -> Router {
    use hyper::service::Service as _;
    let service = hyper_util::service::TowerToHyperService::new(warp::service(filter));
    Arc::new(move |req: Request<Full<Bytes>>| {
        // One name per resource: `/v1/keys/` is not `/v1/keys` (warp's
        // path matching would take both).
        let path = req.uri().path();
        if path.len() > 1 && path.ends_with('/') {
            // Counted as an unmatched route, as any other unknown path.
            let mut response = ApiError::NotFound.into_response();
            response.extensions_mut().insert(Routed);
            return Box::pin(async move { response })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;
        }
        let call = service.call(req);
        Box::pin(async move {
            match call.await {
                Ok(response) => response,
                // warp's service error type is Infallible.
                Err(never) => match never {},
            }
        })
    })
}

/// The API: shared state and routes.
pub struct Api {
    /// The shared state.
    pub state: Arc<ServerState>,
    /// The `/v1` routes.
    pub router: Router,
    /// Who may call, and how callers are told apart.
    pub access: Access,
}

/// How a listener admits callers.
#[derive(Debug)]
pub enum Access {
    /// The API: mutual TLS; the caller is the client certificate's URI SAN,
    /// its roles come from `[roles]`, and it is rate-limited per identity.
    Mutual,
    /// The public log listener (`[audit.public]`): no client certificate, no
    /// role; callers are rate-limited per IPv4 address or IPv6 /64, and the router holds
    /// only the read-only `/v1/log/` paths.
    Public(super::ratelimit::RateLimiter),
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// One TLS connection, as the pipeline sees it.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The certificate's URI SAN, or why it has none usable.
    pub identity: Result<String, IdentityError>,
    /// The client certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The connection was made with TLS 1.2 (`tls.min_version = "1.2"`).
    pub tls12: bool,
    /// Set once the chain failed a re-check; every later request is refused.
    pub rejected: AtomicBool,
    /// The earliest `notAfter` in the chain (seconds since the Unix epoch),
    /// or 0 when one could not be read: a passed re-check holds no longer.
    pub chain_valid_until: u64,
    /// The last re-check that passed, while it holds.
    pub rechecked: Mutex<Option<Rechecked>>,
    /// Request activity, for the idle and header timeouts.
    pub activity: Arc<Activity>,
}

/// A re-check of a connection's chain that passed: it holds for later
/// requests on that connection while the configuration generation is the
/// same and the clock is in `[at, until)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rechecked {
    /// The configuration generation whose CAs, CRLs and TLS versions it
    /// passed.
    pub generation: u64,
    /// When it passed (seconds since the Unix epoch).
    pub at: u64,
    /// The earliest of the chain's `notAfter` and the CRLs' `nextUpdate`.
    pub until: u64,
}

impl ConnInfo {
    /// The connection as the accept loop found it: `chain` leaf first,
    /// `identity` read from its leaf.
    pub fn new(
        remote: SocketAddr,
        identity: Result<String, IdentityError>,
        chain: Vec<CertificateDer<'static>>,
        tls12: bool,
        activity: Arc<Activity>,
    ) -> Self {
        let chain_valid_until = chain.iter().fold(u64::MAX, |until, cert| {
            super::identity::not_after(cert.as_ref()).map_or(0, |t| until.min(t))
        });
        ConnInfo {
            remote,
            identity,
            chain,
            tls12,
            rejected: AtomicBool::new(false),
            chain_valid_until,
            rechecked: Mutex::new(None),
            activity,
        }
    }

    /// Checks the chain against `live`'s CAs and CRLs at `now`, and the
    /// connection's TLS version against its `min_version`, the checks a
    /// full handshake would make, unless one under the same generation
    /// passed and still holds. A reload (new CAs or CRLs) makes a new
    /// generation; an expiring certificate or CRL ends the pass at its
    /// time; a clock that went back checks again.
    ///
    /// # Errors
    /// The metrics reason of the failure (`certificate_revoked`, …).
    fn recheck(&self, live: &Reloadable, now: UnixTime) -> Result<(), &'static str> {
        let secs = now.as_secs();
        let holds =
            |p: &Rechecked| p.generation == live.generation && p.at <= secs && secs < p.until;
        if self.lock_rechecked().as_ref().is_some_and(holds) {
            return Ok(());
        }
        let result = live.tls.recheck(&self.chain, self.tls12, now);
        *self.lock_rechecked() = result.is_ok().then_some(Rechecked {
            generation: live.generation,
            at: secs,
            until: self.chain_valid_until.min(live.tls.crls_valid_until),
        });
        result
    }

    fn lock_rechecked(&self) -> std::sync::MutexGuard<'_, Option<Rechecked>> {
        // Only a copy in or out happens under the lock: it cannot be
        // poisoned in practice, and a value left by a panic would be a
        // whole one.
        self.rechecked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Answers one request on `conn`.
pub async fn handle<B>(api: Arc<Api>, conn: Arc<ConnInfo>, req: Request<B>) -> Response
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let _busy = conn.activity.request_started();
    let identity = match (&api.access, &conn.identity) {
        (Access::Public(_), _) => "(public)",
        (Access::Mutual, Ok(uri)) => uri.as_str(),
        (Access::Mutual, Err(_)) => "(none)",
    };
    let span = tracing::info_span!(
        "request",
        identity,
        remote = %conn.remote,
        method = %req.method(),
        route = tracing::field::Empty,
        warrant_id = tracing::field::Empty,
    );
    let ctx = Arc::new(RequestContext::new(span.clone()));
    let allow = allowed_method(req.uri().path());
    let (mut response, unread) = admit_and_route(&api, conn.clone(), ctx.clone(), req)
        .instrument(span.clone())
        .await;
    if let Some(body) = unread {
        server::linger(body, &conn.activity, &mut response);
    }
    // A 405 says which method the path takes (RFC 9110 §15.5.6).
    if response.status() == warp::http::StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    // Nothing is cached unless its route says so (immutable log tiles).
    response
        .headers_mut()
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));

    let route = ctx.route().unwrap_or_else(|| {
        if response.extensions().get::<Routed>().is_some() {
            UNMATCHED
        } else {
            UNROUTED
        }
    });
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    match api.access {
        Access::Mutual => api
            .state
            .metrics
            .request(route, status, elapsed.as_secs_f64()),
        Access::Public(_) => api.state.metrics.public_request(route, status),
    }
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    // A client past its rate limit can ask for a 429 as fast as it can
    // send: those lines are throttled, the others all written.
    let left_out = if status == 429 {
        RATE_LIMITED_LINES.admit(identity, Instant::now())
    } else {
        Some(0)
    };
    if let Some(left_out) = left_out {
        span.in_scope(|| {
            tracing::info!(
                status,
                code,
                route,
                ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                rate_limited_left_out = (left_out > 0).then_some(left_out),
                "request"
            );
        });
    }
    response
}

/// The request lines of 429s: one a second per identity (per listener
/// kind: the public listener's callers are all `(public)`).
static RATE_LIMITED_LINES: std::sync::LazyLock<LineThrottle> =
    std::sync::LazyLock::new(LineThrottle::new);

/// The method `path` takes: each route takes one, POST for the two that
/// take a body ([`super::routes::ROUTES`]), GET for every other (the log's
/// tiles, the admin listener's routes).
fn allowed_method(path: &str) -> &'static str {
    super::routes::ROUTES
        .iter()
        .find(|(_, template)| *template == path)
        .map_or("GET", |(method, _)| method)
}

/// Marks a response that came out of the route table.
#[derive(Debug, Clone, Copy)]
struct Routed;

/// The answer, and the request body if it was not read to its end.
async fn admit_and_route<B>(
    api: &Api,
    conn_arc: Arc<ConnInfo>,
    ctx: Arc<RequestContext>,
    req: Request<B>,
) -> (Response, Option<B>)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn: &ConnInfo = &conn_arc;
    let (parts, body) = req.into_parts();
    let early = |e: ApiError, body: B| (e.into_response(), Some(body));
    let state = &api.state;
    let mut live = state.current();
    let (uri, mut roles) = match &api.access {
        Access::Public(limiter) => {
            let ip = conn.remote.ip();
            if let Err(retry_after) = limiter.check(&super::ratelimit::peer_key(ip), Instant::now())
            {
                return early(ApiError::RateLimited { retry_after }, body);
            }
            (format!("public:{ip}"), Default::default())
        }
        Access::Mutual => {
            let uri = match &conn.identity {
                Ok(uri) => uri.clone(),
                Err(e) => return early(ApiError::InvalidClientIdentity(e.clone()), body),
            };
            // The rate limit first: a request over it costs no certificate
            // work (a client can make every request re-check its chain,
            // e.g. with an expired extra certificate in it). Its token is
            // taken only once the certificate passes: a connection whose
            // certificate a reload revoked is refused and closed without
            // spending the tokens of the identity's other, valid clients.
            if let Err(retry_after) = state.rate_limiter.peek(&uri, Instant::now()) {
                return early(ApiError::RateLimited { retry_after }, body);
            }
            if let Err(e) = admit(state, conn, &live) {
                return early(e, body);
            }
            if let Err(retry_after) = state.rate_limiter.check(&uri, Instant::now()) {
                return early(ApiError::RateLimited { retry_after }, body);
            }
            let roles = live.roles.roles(&uri);
            (uri, roles)
        }
    };

    // The public listener serves only GETs of the log: it reads no body
    // from anyone, so none can hold memory there for the body timeout. On
    // the API listener, a body is read only for a route that takes one and
    // that the caller may reach: anyone else is answered at once (403, 404,
    // 405), without a buffer held until the body comes or its timeout, and
    // whatever body was sent is drained or the connection closed.
    let wanted = match &api.access {
        Access::Public(_) => Some(0),
        Access::Mutual => super::routes::takes_body(&parts.method, parts.uri.path(), &roles)
            .then_some(state.limits.max_body_bytes),
    };
    // Revocations have a budget of their own: unwrap bodies (large
    // batches, slow senders) cannot crowd out a revocation. The admin's
    // have one more: any role may post a revocation (an authority's may
    // come through anyone), so the caller about to be revoked could hold
    // the revocations' whole budget with slow bodies.
    let budget = if parts.uri.path() != super::routes::REVOCATIONS {
        &state.bodies
    } else if roles.contains(&Role::Admin) {
        &state.admin_revocation_bodies
    } else {
        &state.revocation_bodies
    };
    let (bytes, unread) = match wanted {
        None => (Bytes::new(), Some(body)),
        Some(max_body) => match read_bounded_body(
            &parts.headers,
            body,
            max_body,
            state.limits.body_read_timeout,
            budget,
        )
        .await
        {
            Ok(bytes) => (bytes, None),
            Err((e, unread)) => return (e.into_response(), unread),
        },
    };
    // One configuration decides the whole request: after a reload while
    // the body was read (a slow client can make that take the whole
    // `body_read_timeout`), the caller is admitted again under the new
    // one, which the handler then uses too. Otherwise a single reload that
    // both revoked a caller and loosened the warrant policy could let
    // through a request that neither configuration allows.
    if matches!(api.access, Access::Mutual) {
        let newest = state.current();
        if !Arc::ptr_eq(&newest, &live) {
            if let Err(e) = admit(state, conn, &newest) {
                return (e.into_response(), None);
            }
            roles = newest.roles.roles(&uri);
            live = newest;
        }
    }
    let mut req = Request::from_parts(parts, Full::new(bytes));
    if matches!(api.access, Access::Mutual) {
        req.extensions_mut().insert(Readmission {
            state: state.clone(),
            conn: conn_arc.clone(),
            uri: uri.clone(),
        });
    }
    req.extensions_mut()
        .insert(PeerIdentity::new(uri, roles, conn.remote));
    req.extensions_mut().insert(Admitted(live));
    req.extensions_mut().insert(ctx);
    let mut response = (api.router)(req).await;
    response.extensions_mut().insert(Routed);
    (response, unread)
}

/// Admits a request's caller again under a newer configuration, for a
/// handler whose work starts later than its admission (an unwrap that
/// waited for its turn at the envelope gate while a reload applied).
#[derive(Clone)]
pub(crate) struct Readmission {
    state: Arc<ServerState>,
    conn: Arc<ConnInfo>,
    uri: String,
}

impl Readmission {
    /// `Ok(None)` while `admitted` is still the configuration in force;
    /// else the newer one, once the caller's certificate passes under it
    /// and it still holds one of `roles` (any role, if `roles` is empty,
    /// as [`super::routes::ANY_ROLE`]).
    ///
    /// # Errors
    /// [`ApiError::CertificateRejected`] (the connection is then closed)
    /// or [`ApiError::Forbidden`].
    pub(crate) fn current(
        &self,
        admitted: &Arc<Reloadable>,
        roles: &'static [super::identity::Role],
    ) -> Result<Option<Arc<Reloadable>>, ApiError> {
        let newest = self.state.current();
        if Arc::ptr_eq(&newest, admitted) {
            return Ok(None);
        }
        admit(&self.state, &self.conn, &newest)?;
        if !super::routes::roles_allow(roles, &newest.roles.roles(&self.uri)) {
            return Err(ApiError::forbidden(&self.uri, roles));
        }
        Ok(Some(newest))
    }
}

/// The configuration a request was admitted under (its caller's
/// certificate re-check and roles); its handler uses the same one
/// ([`super::routes::admitted`]).
#[derive(Clone)]
pub(crate) struct Admitted(pub(crate) Arc<Reloadable>);

/// Whether the connection's client certificate is still accepted under
/// `live` (a reload may have changed the CAs or CRLs, or time may have run
/// out on it); a refusal closes the connection.
fn admit(state: &ServerState, conn: &ConnInfo, live: &Reloadable) -> Result<(), ApiError> {
    if conn.rejected.load(Ordering::SeqCst) {
        return Err(ApiError::CertificateRejected(
            "refused earlier on this connection",
        ));
    }
    conn.recheck(live, UnixTime::now()).map_err(|reason| {
        conn.rejected.store(true, Ordering::SeqCst);
        state.metrics.tls_handshake_failure(reason);
        tracing::warn!(reason, "connection no longer accepted; closing it");
        ApiError::CertificateRejected(reason)
    })
}

/// Bounds the bytes of request bodies a listener holds at once
/// (`[limits] max_body_bytes_in_flight`), over all its connections: without
/// it, `max_connections` clients each sending `max_body_bytes` could make
/// the process hold their product (1 GiB at the defaults), and the witness
/// listener takes bodies from anyone.
///
/// A body is counted from before its first byte is read until its bytes
/// are freed: the [`Bytes`] that [`read_bounded_body`] returns own the hold,
/// so it lasts as long as any handler (or a blocking task still working
/// after its client went away) keeps them. It counts its declared
/// `Content-Length`, or `max_body_bytes` while a chunked body (whose end is
/// not known) is read, then its length. One that does not fit is not read:
/// it is answered at once with 503 `server_busy` and `Retry-After`, and
/// drained like any early answer. Refusing at once, rather than queueing,
/// keeps a request from waiting behind slow senders that hold the budget.
/// The API has two, one for revocations and one for everything else (the
/// public log listener reads no body); `lavd witness serve` has its own.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    /// The setting that sizes it, for the refusal's message.
    setting: &'static str,
    /// Another budget a body that does not fit this one may take its bytes
    /// from (the admin's revocations: the revocations' budget).
    fallback: Option<Box<BodyBudget>>,
}

/// Bytes of a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
struct BodyHold {
    bytes: tokio::sync::OwnedSemaphorePermit,
}

impl BodyHold {
    /// Gives `n` of the bytes held back at once.
    fn give_back(&mut self, n: usize) {
        drop(self.bytes.split(n));
    }
}

/// A body's bytes with their hold: what [`Bytes`] owns.
struct HeldBody {
    bytes: Vec<u8>,
    _hold: BodyHold,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl BodyBudget {
    /// A budget of `capacity` bytes, the value of `setting`.
    pub fn new(capacity: usize, setting: &'static str) -> Self {
        // The semaphore's own bound (`usize::MAX >> 3`; on 64-bit targets
        // far above the configured range, at most 64 GiB).
        let capacity = capacity.min(tokio::sync::Semaphore::MAX_PERMITS);
        BodyBudget {
            bytes: Arc::new(tokio::sync::Semaphore::new(capacity)),
            capacity,
            setting,
            fallback: None,
        }
    }

    /// This budget, taking from `other` (shared with it, not a copy) what
    /// does not fit here.
    pub fn or_else(mut self, other: &BodyBudget) -> Self {
        self.fallback = Some(Box::new(BodyBudget {
            fallback: None,
            ..other.clone()
        }));
        self
    }

    /// `n` bytes, or [`ApiError::Busy`] if fewer are free.
    fn hold(&self, n: usize) -> Result<BodyHold, ApiError> {
        let busy = ApiError::Busy {
            limit: self.capacity,
            setting: self.setting,
        };
        let Ok(count) = u32::try_from(n) else {
            return Err(busy);
        };
        match self.bytes.clone().try_acquire_many_owned(count) {
            Ok(bytes) => Ok(BodyHold { bytes }),
            Err(_) => match &self.fallback {
                Some(other) => other.hold(n).map_err(|_| busy),
                None => Err(busy),
            },
        }
    }

    /// Bytes not held.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Bytes held (`lavd_request_body_bytes_held`).
    pub fn held(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.available_permits())
    }
}

/// Reads a request body of at most `limit` bytes within `timeout`, holding
/// its bytes in `budget` first; a `Content-Length` above the limit is
/// refused before reading. The bytes, which hold their part of `budget`
/// until they are freed; on failure, the error and the body if there may be
/// more of it to drain.
pub(crate) async fn read_bounded_body<B>(
    headers: &warp::http::HeaderMap,
    body: B,
    limit: usize,
    timeout: Duration,
    budget: &BodyBudget,
) -> Result<Bytes, (ApiError, Option<B>)>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((ApiError::BodyTooLarge { limit }, Some(body)));
    }
    // Where no body is taken (the public log listener), a chunked one is
    // refused before any of it is read too: waiting for its chunks would
    // let a peer that sends none hold its connection for the body timeout,
    // past the idle one.
    if limit == 0 && declared.is_none() && body.size_hint().exact() != Some(0) {
        return Err((ApiError::BodyTooLarge { limit }, Some(body)));
    }
    // hyper knows an empty body's size (no `Content-Length`, not chunked);
    // only a chunked one is counted at the most it may grow to.
    let expected = declared
        .or_else(|| body.size_hint().exact())
        .map_or(limit, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let mut hold = match budget.hold(expected) {
        Ok(hold) => hold,
        Err(e) => return Err((e, Some(body))),
    };
    // Counted already: the whole declared length at once, no regrowth.
    let capacity = declared.map_or(0, |_| expected);
    let mut bytes = read_body(body, limit, timeout, capacity).await?;
    if bytes.len() < expected {
        // A chunked body ended short of the limit it was counted at.
        bytes.shrink_to_fit();
        hold.give_back(expected - bytes.len());
    }
    Ok(Bytes::from_owner(HeldBody { bytes, _hold: hold }))
}

/// Why a body was not read whole.
enum BodyError {
    TooLarge,
    Unreadable(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads a whole body, at most `limit` bytes, within `timeout`, into a
/// buffer of `capacity` bytes to start with. On failure,
/// the error and the body if there may be more of it to drain (not after a
/// transport error: that body has ended).
async fn read_body<B>(
    mut body: B,
    limit: usize,
    timeout: Duration,
    capacity: usize,
) -> Result<Vec<u8>, (ApiError, Option<B>)>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = async {
        let mut bytes = Vec::with_capacity(capacity);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Unreadable(e.into()))?;
            if let Ok(mut data) = frame.into_data() {
                if data.remaining() > limit - bytes.len() {
                    return Err(BodyError::TooLarge);
                }
                while data.has_remaining() {
                    let chunk = data.chunk();
                    bytes.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
        Ok(bytes)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Err(_) => Err((ApiError::RequestTimeout, Some(body))),
        Ok(Err(BodyError::TooLarge)) => Err((ApiError::BodyTooLarge { limit }, Some(body))),
        Ok(Err(BodyError::Unreadable(e))) => {
            tracing::debug!(error = %e, "request body unreadable");
            Err((
                ApiError::Malformed("the request body could not be read".into()),
                None,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_whatever_their_framing() {
        let ok = read_body(
            Full::new(Bytes::from(vec![7u8; 1024])),
            1024,
            Duration::from_secs(1),
            0,
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
        assert_eq!(ok.len(), 1024);
        let e = read_body(
            Full::new(Bytes::from(vec![7u8; 1025])),
            1024,
            Duration::from_secs(1),
            0,
        )
        .await
        .unwrap_err();
        assert_eq!(e.0.code(), "body_too_large");
        assert!(
            e.1.is_some(),
            "an oversized body is handed back to be drained"
        );
    }

    /// A body that never yields a frame.
    struct Stalled;
    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let e = read_body(Stalled, 1024, Duration::from_millis(20), 0)
            .await
            .unwrap_err();
        assert_eq!(e.0.code(), "request_timeout");
    }

    /// Headers declaring `len` bytes, or none (chunked).
    fn declaring(len: Option<usize>) -> warp::http::HeaderMap {
        let mut headers = warp::http::HeaderMap::new();
        if let Some(n) = len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        headers
    }

    /// A body whose size is not known in advance, as a chunked one's.
    struct Chunked(Option<Bytes>);
    impl Body for Chunked {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.take().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }
    fn chunked(n: usize) -> Chunked {
        Chunked(Some(Bytes::from(vec![b' '; n])))
    }

    #[tokio::test]
    async fn a_body_is_counted_from_before_its_read_until_its_bytes_are_freed() {
        let budget = BodyBudget::new(4096, "limits.max_body_bytes_in_flight");
        let second = Duration::from_secs(1);
        let body = |n| Full::new(Bytes::from(vec![b' '; n]));

        // A declared length is counted as declared, while any clone of the
        // bytes lives (a handler's blocking task may outlive its request).
        let bytes = read_bounded_body(&declaring(Some(3000)), body(3000), 4096, second, &budget)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(bytes.len(), 3000);
        assert_eq!(budget.free(), 1096);
        let kept = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(budget.free(), 1096, "a slice still holds the buffer");

        // One that does not fit is refused unread, and handed back to drain.
        let (e, unread) =
            read_bounded_body(&declaring(Some(2000)), body(2000), 4096, second, &budget)
                .await
                .unwrap_err();
        assert_eq!(
            e,
            ApiError::Busy {
                limit: 4096,
                setting: "limits.max_body_bytes_in_flight"
            }
        );
        assert_eq!(e.status(), warp::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(unread.is_some());
        assert_eq!(budget.free(), 1096, "a refused body holds nothing");

        // An empty body (its size known) fits in what is left…
        let empty = read_bounded_body(&declaring(None), body(0), 4096, second, &budget)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        // …but a chunked one counts at the limit while it is read.
        let (e, _) = read_bounded_body(&declaring(None), chunked(10), 2000, second, &budget)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "server_busy");

        drop((kept, empty));
        assert_eq!(budget.free(), 4096);
        // Once read, it counts its length.
        let bytes = read_bounded_body(&declaring(None), chunked(10), 2000, second, &budget)
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(&bytes[..], &[b' '; 10]);
        assert_eq!(budget.free(), 4086);
        drop(bytes);

        // A body too large while read, or that times out, gives its bytes
        // back.
        let (e, _) = read_bounded_body(&declaring(None), chunked(3000), 2000, second, &budget)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "body_too_large");
        assert_eq!(budget.free(), 4096);
        let (e, _) = read_bounded_body(
            &declaring(Some(100)),
            Stalled,
            2000,
            Duration::from_millis(20),
            &budget,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "request_timeout");
        assert_eq!(budget.free(), 4096);
    }
}
