//! The listeners: a TCP accept loop per listener, a TLS handshake for the
//! API (warp has no TLS of its own), and hyper's HTTP/1 connection driver
//! with lavd's timeouts around it.
//!
//! Bounds, from `[limits]`: at most `max_connections` API connections (a
//! semaphore taken *before* `accept`, so the excess waits in the kernel's
//! backlog rather than costing a task and a handshake), a handshake
//! deadline, a header-read deadline that starts with the first byte of a
//! request head, and an idle deadline for keep-alive connections with no
//! request in flight. Optionally, at most so many connections from one
//! peer (an IPv4 address or an IPv6 /64, [`super::ratelimit::peer_key`]):
//! one more is closed as soon as it is accepted, before its handshake
//! ([`PeerBound`]), so that one address cannot hold every slot.
//!
//! Early answers: a reply sent before its request's body was read (413,
//! 429, 408, a refused identity…) is marked `Connection: close`, and the rest
//! of the body is read and discarded in the background, at most
//! [`LINGER_MAX_BYTES`] for at most [`LINGER_MAX_TIME`], before the
//! connection closes with a TLS `close_notify` (what nginx calls a lingering
//! close). Closing a socket with unread data makes the kernel send a reset,
//! and a client still writing its body (one that does not send
//! `Expect: 100-continue`) would then lose the answer.
//!
//! Shutdown: [`Listener::shutdown`] stops accepting, asks every connection
//! to finish its in-flight request and close, waits up to the grace period,
//! then aborts what is left.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use warp::http::Request;

use super::identity::{uri_san, IdentityError};
use super::pipeline::{self, Access, Api, ConnInfo, Router};
use super::tls;

/// A listener could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address is in use, not local, or needs privileges.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Bind { .. } => "cannot_listen",
        }
    }
}

/// At most this much of an unread request body is read and discarded after
/// an early answer, before the connection is closed (64 MiB, the largest
/// `max_body_bytes`).
pub const LINGER_MAX_BYTES: u64 = 64 << 20;
/// At most this long is spent reading and discarding an unread request body
/// after an early answer (nginx's `lingering_timeout` default).
pub const LINGER_MAX_TIME: Duration = Duration::from_secs(5);

/// Reads and discards what is left of `body` after an early answer, within
/// [`LINGER_MAX_BYTES`] and [`LINGER_MAX_TIME`], on its own task: hyper reads
/// the connection for as long as the body is wanted, and closes it (with a
/// TLS `close_notify`) once the body is finished or dropped. The connection
/// counts as busy meanwhile, so its idle and header deadlines do not cut the
/// drain short. `response` gets `Connection: close`.
///
/// A body already at its end needs nothing: the connection stays open. A
/// body declared longer than [`LINGER_MAX_BYTES`] is not drained at all.
pub(crate) fn linger<B>(body: B, activity: &Arc<Activity>, response: &mut warp::reply::Response)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
{
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return;
    }
    response.headers_mut().insert(
        warp::http::header::CONNECTION,
        warp::http::HeaderValue::from_static("close"),
    );
    if body.size_hint().lower() > LINGER_MAX_BYTES {
        // Declared longer than the drain would read: the client sees a
        // reset whatever happens, so do not spend the reads.
        return;
    }
    let busy = activity.request_started();
    tokio::spawn(async move {
        let _busy = busy;
        let mut body = body;
        let mut read = 0u64;
        let discard = async {
            while read < LINGER_MAX_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            read += hyper::body::Buf::remaining(data) as u64;
                        }
                    }
                    // The end of the body, or the client gave up.
                    Some(Err(_)) | None => return true,
                }
            }
            false
        };
        let finished = tokio::time::timeout(LINGER_MAX_TIME, discard)
            .await
            .unwrap_or(false);
        if !finished {
            tracing::debug!(
                read,
                "unread request body beyond the linger bounds; closing"
            );
        }
    });
}

/// The deadlines a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake (API only).
    pub handshake: Duration,
    /// From the first byte of a request head to its end.
    pub header_read: Duration,
    /// With no request in flight and nothing received.
    pub idle: Duration,
}

impl Timeouts {
    /// How often a connection checks its deadlines: a quarter of the
    /// shortest, between 100 ms and 1 s. A deadline is enforced within that
    /// much of its nominal value.
    fn tick(&self) -> Duration {
        (self.header_read.min(self.idle) / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// A running listener.
#[derive(Debug)]
pub struct Listener {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    abort: Arc<Notify>,
    task: tokio::task::JoinHandle<usize>,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open at the end of the grace period and aborted.
    pub aborted: usize,
}

impl Listener {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and lets connections finish their in-flight requests
    /// until `deadline` completes (the grace period, or a second signal),
    /// then aborts the rest.
    pub async fn shutdown(mut self, deadline: impl std::future::Future<Output = ()>) -> Drained {
        let _ = self.stop.send(true);
        tokio::select! {
            joined = &mut self.task => Drained {
                aborted: joined.unwrap_or(0),
            },
            () = deadline => {
                self.abort.notify_one();
                Drained {
                    aborted: (&mut self.task).await.unwrap_or(0),
                }
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServeError> {
    let err = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Starts an API listener: the mutual-TLS API, or the public log listener,
/// as `api.access` says, with at most `max` connections at once and at
/// most `per_peer` from one peer. A connection closed for being over
/// `per_peer` counts as a failed handshake with reason
/// `peer_connection_limit`, in that listener's metric family.
///
/// # Errors
/// [`ServeError::Bind`].
pub async fn serve_api(
    api: Arc<Api>,
    addr: SocketAddr,
    max: usize,
    per_peer: usize,
) -> Result<Listener, ServeError> {
    let (listener, local_addr) = bind(addr).await?;
    let metrics = api.state.metrics.clone();
    let public = matches!(api.access, Access::Public(_));
    let bound = PeerBound {
        max: per_peer,
        refused: Arc::new(move || {
            if public {
                metrics.public_tls_handshake_failure(PEER_CONNECTION_LIMIT);
            } else {
                metrics.tls_handshake_failure(PEER_CONNECTION_LIMIT);
            }
        }),
    };
    Ok(spawn_accept_loop(
        listener,
        local_addr,
        max,
        Some(bound),
        move |tcp, remote, stop| api_connection(api.clone(), tcp, remote, stop),
    ))
}

/// The reason, in the handshake-failure metrics and lines, of a connection
/// closed because its peer already held [`PeerBound::max`].
pub const PEER_CONNECTION_LIMIT: &str = "peer_connection_limit";

/// At most `max` connections at once from one peer: an IPv4 address, or an
/// IPv6 /64 ([`super::ratelimit::peer_key`], the key of the public rate
/// limits). One more is closed as soon as it is accepted, before any
/// handshake, and `refused` is called (for a metric); a line says so, at
/// most once a second.
#[derive(Clone)]
pub struct PeerBound {
    /// Most connections from one peer.
    pub max: usize,
    /// Called for each connection closed for being over `max`.
    pub refused: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for PeerBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerBound")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// The connections each peer holds, under a [`PeerBound`].
struct PeerCounts {
    bound: PeerBound,
    held: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl PeerCounts {
    /// A slot for a connection from `ip`, or None if its peer holds the
    /// most it may.
    fn enter(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let key = super::ratelimit::peer_key(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.bound.max {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.clone(),
            key,
        })
    }
}

/// One connection's place in [`PeerCounts`], given back when dropped.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    key: String,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Starts a plain-HTTP listener (the admin endpoints) answering every
/// request with `router`. Request bodies are not read.
///
/// # Errors
/// [`ServeError::Bind`].
pub async fn serve_plain(
    addr: SocketAddr,
    max_connections: usize,
    timeouts: Timeouts,
    router: Router,
) -> Result<Listener, ServeError> {
    let (listener, local_addr) = bind(addr).await?;
    Ok(spawn_accept_loop(
        listener,
        local_addr,
        max_connections,
        None,
        move |tcp, _remote, stop| plain_connection(router.clone(), tcp, timeouts, stop),
    ))
}

async fn plain_connection(
    router: Router,
    tcp: TcpStream,
    timeouts: Timeouts,
    stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let router = router.clone();
        let activity = busy.clone();
        async move {
            let _busy = activity.request_started();
            let (parts, unread) = req.into_parts();
            let mut response = router(Request::from_parts(parts, Full::new(Bytes::new()))).await;
            linger(unread, &activity, &mut response);
            Ok::<_, Infallible>(response)
        }
    });
    let io = TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
    });
    drive(
        http1_builder(16 << 10).serve_connection(io, service),
        &activity,
        timeouts,
        stop,
    )
    .await;
}

/// What a listener without client certificates answers each request with:
/// the request (body unread), the peer's address, and the connection's
/// activity (for [`linger`]).
pub type PublicHandler = Arc<
    dyn Fn(
            Request<Incoming>,
            SocketAddr,
            Arc<Activity>,
        ) -> Pin<Box<dyn std::future::Future<Output = warp::reply::Response> + Send>>
        + Send
        + Sync,
>;

/// Starts a TLS listener that asks for no client certificate (a witness,
/// which anyone may call), with the API's connection bounds: at most
/// `max_connections`, at most `per_peer.max` from one peer, the handshake,
/// header and idle deadlines of `timeouts`, heads of at most
/// `max_header_bytes`.
///
/// # Errors
/// [`ServeError::Bind`].
pub async fn serve_public_tls(
    addr: SocketAddr,
    max_connections: usize,
    per_peer: PeerBound,
    timeouts: Timeouts,
    max_header_bytes: usize,
    tls: Arc<rustls::ServerConfig>,
    handler: PublicHandler,
) -> Result<Listener, ServeError> {
    let (listener, local_addr) = bind(addr).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(spawn_accept_loop(
        listener,
        local_addr,
        max_connections,
        Some(per_peer),
        move |tcp, remote, stop| {
            public_connection(
                acceptor.clone(),
                handler.clone(),
                tcp,
                remote,
                timeouts,
                max_header_bytes,
                stop,
            )
        },
    ))
}

async fn public_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    handler: PublicHandler,
    tcp: TcpStream,
    remote: SocketAddr,
    timeouts: Timeouts,
    max_header_bytes: usize,
    mut stop: watch::Receiver<bool>,
) {
    let Some(Ok(stream)) = accept_tls(&acceptor, tcp, remote, timeouts.handshake, &mut stop).await
    else {
        return;
    };
    let activity = Arc::new(Activity::new());
    let busy = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let activity = busy.clone();
        async move {
            let _busy = activity.request_started();
            Ok::<_, Infallible>(handler(req, remote, activity.clone()).await)
        }
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    drive(
        http1_builder(max_header_bytes).serve_connection(io, service),
        &activity,
        timeouts,
        stop,
    )
    .await;
}

fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    local_addr: SocketAddr,
    max_connections: usize,
    per_peer: Option<PeerBound>,
    connection: F,
) -> Listener
where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, stop_rx) = watch::channel(false);
    let abort = Arc::new(Notify::new());
    let task = tokio::spawn(accept_loop(
        listener,
        max_connections,
        per_peer,
        connection,
        stop_rx,
        abort.clone(),
    ));
    Listener {
        local_addr,
        stop,
        abort,
        task,
    }
}

/// Accepts until told to stop, then waits for the connections to finish
/// (or for the abort signal). Returns the number of aborted connections.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    per_peer: Option<PeerBound>,
    connection: F,
    mut stop: watch::Receiver<bool>,
    abort: Arc<Notify>,
) -> usize
where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let peers = per_peer.map(|bound| {
        Arc::new(PeerCounts {
            bound,
            held: Default::default(),
        })
    });
    let mut connections = JoinSet::new();
    loop {
        while let Some(done) = connections.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "connection task failed");
            }
        }
        let permit = tokio::select! {
            _ = stopped(&mut stop) => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match &peers {
            None => None,
            Some(peers) => match peers.enter(remote.ip()) {
                Some(slot) => Some(slot),
                None => {
                    (peers.bound.refused)();
                    if let Some(left_out) =
                        HANDSHAKE_LINES.admit(PEER_CONNECTION_LIMIT, std::time::Instant::now())
                    {
                        tracing::info!(
                            %remote,
                            reason = PEER_CONNECTION_LIMIT,
                            max = peers.bound.max,
                            left_out,
                            "connection closed: its address already holds the most connections \
                             one address may"
                        );
                    }
                    // Closed at once: no task, no handshake.
                    drop(tcp);
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let conn = connection(tcp, remote, stop.clone());
        connections.spawn(async move {
            conn.await;
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = async { while connections.join_next().await.is_some() {} } => 0,
        _ = abort.notified() => {
            let left = connections.len();
            connections.abort_all();
            while connections.join_next().await.is_some() {}
            left
        }
    }
}

/// The TLS handshake within `timeout`: the stream, or the metrics reason
/// of its failure (logged here); None when the listener stops first (a
/// connection that has not sent a request yet has nothing to drain).
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<tokio_rustls::server::TlsStream<TcpStream>, &'static str>> {
    let handshake = tokio::select! {
        _ = stopped(stop) => return None,
        r = tokio::time::timeout(timeout, acceptor.accept(tcp)) => r,
    };
    Some(match handshake {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            let reason = tls::handshake_failure_reason(&e);
            if let Some(left_out) = HANDSHAKE_LINES.admit(reason, std::time::Instant::now()) {
                tracing::info!(%remote, reason, error = %e, left_out, "TLS handshake failed");
            }
            Err(reason)
        }
        Err(_) => {
            if let Some(left_out) =
                HANDSHAKE_LINES.admit("handshake_timeout", std::time::Instant::now())
            {
                tracing::info!(%remote, left_out, "TLS handshake timed out");
            }
            Err("handshake_timeout")
        }
    })
}

/// Lines about failed handshakes, which anyone who can connect can cause:
/// one a second per reason, so that a flood of one kind (say
/// `unknown_issuer`) hides no `certificate_revoked` (`left_out` counts the
/// others of that reason since its last line; the metric
/// `lavd_tls_handshake_failures_total` counts every one).
static HANDSHAKE_LINES: std::sync::LazyLock<super::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(super::ratelimit::LineThrottle::new);

/// One API connection: TLS handshake, identity, then HTTP/1 until it ends.
async fn api_connection(
    api: Arc<Api>,
    tcp: TcpStream,
    remote: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let state = api.state.clone();
    let public = matches!(api.access, Access::Public(_));
    // The public log listener's connections are counted apart: anyone may
    // open them.
    let metrics = state.metrics.clone();
    let delta = move |d| {
        if public {
            metrics.public_connection_delta(d);
        } else {
            metrics.connection_delta(d);
        }
    };
    delta(1);
    let _open = scopeguard(move || delta(-1));
    let limits = &state.limits;
    let timeouts = Timeouts {
        handshake: limits.handshake_timeout,
        header_read: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };

    let tls = state.current().tls.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(if public {
        tls.public_config
    } else {
        tls.server_config
    });
    let stream = match accept_tls(&acceptor, tcp, remote, timeouts.handshake, &mut stop).await {
        None => return,
        Some(Err(reason)) => {
            if public {
                state.metrics.public_tls_handshake_failure(reason);
            } else {
                state.metrics.tls_handshake_failure(reason);
            }
            return;
        }
        Some(Ok(stream)) => stream,
    };

    let chain: Vec<_> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let identity = match chain.first() {
        // The verifier requires a certificate; none here would be a rustls
        // bug, and is refused like an unreadable one. The public listener
        // asks for none and names no one.
        None => Err(IdentityError::Malformed),
        Some(leaf) => uri_san(leaf.as_ref()),
    };
    if let (false, Err(e)) = (public, &identity) {
        state.metrics.tls_handshake_failure(e.reason());
        // Any holder of a certificate from a configured CA can cause it, on
        // every connection: throttled like the handshake failures.
        if let Some(left_out) = HANDSHAKE_LINES.admit(e.reason(), std::time::Instant::now()) {
            tracing::info!(%remote, reason = e.reason(), left_out, "client certificate names no identity; its requests are refused");
        }
    }

    let activity = Arc::new(Activity::new());
    // Anything but TLS 1.3 counts as 1.2 (a completed handshake always has
    // a version): a later `min_version = "1.3"` refuses it.
    let tls12 = stream.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3);
    let conn = Arc::new(ConnInfo::new(
        remote,
        identity,
        chain,
        tls12,
        activity.clone(),
    ));
    let service = hyper::service::service_fn(move |req| {
        let api = api.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(api, conn, req).await) }
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    drive(
        http1_builder(limits.max_header_bytes).serve_connection(io, service),
        &activity,
        timeouts,
        stop,
    )
    .await;
}

/// Runs `conn` to completion, enforcing the header and idle deadlines and
/// closing gracefully when `stop` turns true.
pub(crate) async fn drive<I, S, B>(
    conn: http1::Connection<I, S>,
    activity: &Activity,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut tick = tokio::time::interval(timeouts.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopped(&mut stop), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => match activity.check(Instant::now(), &timeouts) {
                Verdict::Fine => {}
                Verdict::Idle => if !closing {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                },
                Verdict::HeaderTimeout => {
                    tracing::debug!("request head not received in time; closing");
                    return;
                }
                // Graceful shutdown waits for the response to be written,
                // which a peer that does not read would make forever.
                Verdict::WriteStalled => {
                    tracing::debug!("the peer has not read its responses for the idle timeout; closing");
                    return;
                }
            },
        }
    }
}

/// What a connection has been doing, for its deadlines. Times are
/// milliseconds since the connection started.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the first byte of a request head arrived with no request in
    /// flight; [`NONE`] when no head is being read.
    head_started: AtomicU64,
    /// When the last request finished (or the connection started).
    idle_since: AtomicU64,
    /// Since when a write to the peer has been waiting (the peer's window
    /// and our buffers full: it does not read); [`NONE`] while writes go
    /// through.
    write_blocked_since: AtomicU64,
}

const NONE: u64 = u64::MAX;

/// A connection's state against its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Fine,
    Idle,
    HeaderTimeout,
    WriteStalled,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            head_started: AtomicU64::new(NONE),
            idle_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(NONE),
        }
    }

    /// Notes the outcome of a write, flush or shutdown towards the peer.
    fn on_write<T>(&self, result: &Poll<T>) {
        if result.is_pending() {
            let now = self.millis(Instant::now());
            let _ = self.write_blocked_since.compare_exchange(
                NONE,
                now,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        } else {
            self.write_blocked_since.store(NONE, Ordering::SeqCst);
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(NONE - 1)
    }

    fn on_read(&self, n: usize) {
        if n > 0 && self.in_flight.load(Ordering::SeqCst) == 0 {
            let now = self.millis(Instant::now());
            let _ =
                self.head_started
                    .compare_exchange(NONE, now, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// A request head was parsed (or an unread body is being drained); the
    /// returned guard marks its end.
    pub(crate) fn request_started(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(NONE, Ordering::SeqCst);
        Busy(self.clone())
    }

    pub(crate) fn check(&self, now: Instant, t: &Timeouts) -> Verdict {
        let now_ms = self.millis(now);
        let blocked = self.write_blocked_since.load(Ordering::SeqCst);
        if blocked != NONE && now_ms.saturating_sub(blocked) > millis(t.idle) {
            return Verdict::WriteStalled;
        }
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Verdict::Fine;
        }
        let now = now_ms;
        let head = self.head_started.load(Ordering::SeqCst);
        if head != NONE {
            if now.saturating_sub(head) > millis(t.header_read) {
                return Verdict::HeaderTimeout;
            }
            return Verdict::Fine;
        }
        if now.saturating_sub(self.idle_since.load(Ordering::SeqCst)) > millis(t.idle) {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(NONE - 1)
}

/// A request in flight; dropping it marks the request finished.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since
            .store(a.millis(Instant::now()), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An IO stream that tells its [`Activity`] when request bytes arrive.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.activity
                .on_read(buf.filled().len().saturating_sub(before));
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.on_write(&result);
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.activity.on_write(&result);
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.activity.on_write(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.on_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Completes once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The HTTP/1.1 settings of both listeners. lavd enforces its own header and
/// idle deadlines (see `drive`): hyper's header timeout would also run while a
/// keep-alive connection waits for its next request.
fn http1_builder(max_header_bytes: usize) -> http1::Builder {
    // hyper's read buffer (400 KiB by default) must hold a whole head, or
    // hyper refuses a head within `max_header_bytes` (up to 1 MiB) first.
    const HYPER_DEFAULT_BUFFER: usize = 8192 + 4096 * 100;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_headers(100)
        .max_header_size(max_header_bytes)
        .max_buf_size(HYPER_DEFAULT_BUFFER.max(max_header_bytes + 8192));
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(2),
            idle: Duration::from_secs(5),
        }
    }

    #[test]
    fn idle_counts_from_the_end_of_the_last_request() {
        let a = Arc::new(Activity::new());
        let t = timeouts();
        let start = a.epoch;
        assert_eq!(a.check(start + Duration::from_secs(4), &t), Verdict::Fine);
        assert_eq!(a.check(start + Duration::from_secs(6), &t), Verdict::Idle);
        {
            let _busy = a.request_started();
            // In flight: never idle, however long it takes.
            assert_eq!(a.check(start + Duration::from_secs(60), &t), Verdict::Fine);
        }
        let done = a.idle_since.load(Ordering::SeqCst);
        let after = start + Duration::from_millis(done);
        assert_eq!(a.check(after + Duration::from_secs(4), &t), Verdict::Fine);
        assert_eq!(a.check(after + Duration::from_secs(6), &t), Verdict::Idle);
    }

    #[test]
    fn a_started_head_must_finish_within_the_header_timeout() {
        let a = Arc::new(Activity::new());
        let t = timeouts();
        a.on_read(10);
        let head = a.head_started.load(Ordering::SeqCst);
        assert_ne!(head, NONE);
        let at = a.epoch + Duration::from_millis(head);
        assert_eq!(a.check(at + Duration::from_secs(1), &t), Verdict::Fine);
        assert_eq!(
            a.check(at + Duration::from_secs(3), &t),
            Verdict::HeaderTimeout
        );
        // Once the head is complete the request is in flight.
        let _busy = a.request_started();
        assert_eq!(a.check(at + Duration::from_secs(30), &t), Verdict::Fine);
    }

    #[test]
    fn bytes_read_during_a_request_are_not_a_new_head() {
        let a = Arc::new(Activity::new());
        let busy = a.request_started();
        a.on_read(100);
        drop(busy);
        assert_eq!(a.head_started.load(Ordering::SeqCst), NONE);
    }
}
