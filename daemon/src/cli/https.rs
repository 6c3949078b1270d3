//! A small HTTPS client: for the command-line tools (`lavd audit verify
//! --url`, GET with a client certificate) and for the daemon's witness
//! submitter (POST `add-checkpoint`, no client certificate), against a
//! server certificate checked with a given CA bundle. Same crypto provider
//! as the server (rustls on aws-lc-rs).
//!
//! The server is not trusted: every request (connect, handshake, the whole
//! reply) must finish within [`Limits::timeout`], and no reply body may be
//! larger than [`Limits::max_response_bytes`], so a hostile or broken server
//! can neither hang the tool nor exhaust its memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Default of `--max-response-bytes`: 64 MiB, far above a page of 1000
/// leaves.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Default of `--timeout`, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// What one request may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest reply body accepted, in bytes.
    pub max_response_bytes: usize,
    /// The longest one request may take, from connecting to the last byte
    /// of the reply.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        }
    }
}

/// A request the server did not answer acceptably within [`Limits`]: a
/// hostile, broken or overloaded server.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// No complete reply within `--timeout`.
    #[error("GET {path}: no complete reply within {} s (--timeout)", timeout.as_secs_f64())]
    Timeout {
        /// The request path.
        path: String,
        /// The bound.
        timeout: Duration,
    },
    /// A reply body larger than `--max-response-bytes`, or than the most
    /// the resource asked for can hold (announced or sent).
    #[error(
        "GET {path}: the reply is larger than {limit} bytes (--max-response-bytes, or the most \
         the resource asked for can hold)"
    )]
    TooLarge {
        /// The request path.
        path: String,
        /// The bound.
        limit: usize,
    },
    /// A reply other than 200, with the server's error code and message,
    /// escaped (the server's text never reaches the terminal raw).
    #[error("GET {path}: {status}: {code}: {message}")]
    Status {
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The server's `error.code`, or `?`.
        code: String,
        /// The server's `error.message`.
        message: String,
    },
    /// A reply in a content coding (`Content-Encoding: gzip`, say) that
    /// lavd does not decode. It asks for `identity`; C2SP tlog-tiles lets a
    /// log's static host gzip tiles whatever was asked, and reading such
    /// bytes as a tile would report a malformed log instead.
    #[error(
        "GET {path}: the reply is in the content coding {encoding:?} (Content-Encoding), which \
         lavd does not decode; serve it uncompressed (identity)"
    )]
    Encoded {
        /// The request path.
        path: String,
        /// The `Content-Encoding` header (shown escaped, by `{:?}`).
        encoding: String,
    },
    /// No connection: the name lookup, the TCP connection, the TLS
    /// handshake or the HTTP handshake failed.
    #[error("{target}: {stage} failed: {reason}")]
    Unreachable {
        /// `host:port`.
        target: String,
        /// `name resolution`, `connection`, `TLS handshake` or `HTTP
        /// handshake`.
        stage: &'static str,
        /// Why, as the system or TLS library said.
        reason: String,
    },
}

impl HttpsError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            HttpsError::Timeout { .. } => "response_timeout",
            HttpsError::TooLarge { .. } => "response_too_large",
            HttpsError::Status { .. } => "unexpected_status",
            HttpsError::Encoded { .. } => "response_encoding_unsupported",
            HttpsError::Unreachable { .. } => "connect_failed",
        }
    }
}

/// The most name lookups [`resolve`] runs at once.
const MAX_LOOKUPS: usize = 8;

/// Name lookups under way ([`resolve`]).
static LOOKUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place among [`LOOKUPS`], given back when dropped (also if its thread
/// panics, or cannot be started).
struct Lookup;

impl Drop for Lookup {
    fn drop(&mut self) {
        LOOKUPS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A name lookup's answer, shared by every caller that asked for the name
/// while it ran.
type Answer = Option<Result<Vec<std::net::SocketAddr>, String>>;

/// The lookups under way, by name and port.
type Lookups = std::collections::HashMap<(String, u16), tokio::sync::watch::Receiver<Answer>>;

/// The lookups under way, by name and port: a caller asking for one joins
/// it rather than starting another, so a name whose lookup hangs holds one
/// of the [`MAX_LOOKUPS`] places, however often it is asked for (a
/// witness's submitter retries), not all of them.
static IN_FLIGHT: std::sync::LazyLock<std::sync::Mutex<Lookups>> =
    std::sync::LazyLock::new(Default::default);

/// A lookup's entry in [`IN_FLIGHT`], removed when dropped: also when its
/// thread panics, so that the name is looked up again, not answered "ended
/// without an answer" for good.
struct Forget((String, u16));

impl Drop for Forget {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// The addresses of `host`, on a thread of its own, not tokio's blocking
/// pool (where `TcpStream::connect` would look a name up): in `lavd serve`
/// requests waiting for a witness quorum can hold every thread of that pool
/// (`[server] blocking_threads`), and the submission they wait for must not
/// queue behind them. An IP address is taken as it is. The caller's
/// timeout bounds the wait; a lookup that outlives it ends when the
/// resolver answers, and at most [`MAX_LOOKUPS`] run at once (a resolver
/// that never answers holds that many threads, not one per attempt), one
/// per name and port ([`IN_FLIGHT`]).
async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs as _;
    resolve_with(host, port, |name, port| {
        (name, port)
            .to_socket_addrs()
            .map(Iterator::collect::<Vec<_>>)
    })
    .await
}

/// [`resolve`], looking names up with `lookup`.
async fn resolve_with(
    host: &str,
    port: u16,
    lookup: fn(&str, u16) -> std::io::Result<Vec<std::net::SocketAddr>>,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![std::net::SocketAddr::new(ip, port)]);
    }
    let key = (host.to_string(), port);
    let mut answered = {
        let mut in_flight = IN_FLIGHT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match in_flight.get(&key) {
            Some(running) => running.clone(),
            None => {
                let place = Lookup;
                if LOOKUPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_LOOKUPS {
                    return Err(std::io::Error::other(format!(
                        "{MAX_LOOKUPS} name lookups are still waiting for the resolver"
                    )));
                }
                let (answer, answered) = tokio::sync::watch::channel(None);
                let asked = key.clone();
                std::thread::Builder::new()
                    .name("lavd-resolve".into())
                    .spawn(move || {
                        // Made here, not before the spawn: a spawn that
                        // fails drops the closure while this lock is held.
                        let asked = Forget(asked);
                        let found = lookup(&asked.0 .0, asked.0 .1).map_err(|e| e.to_string());
                        // Gone from the map before the answer is sent: a
                        // caller after this point looks the name up again.
                        drop(asked);
                        drop(place);
                        let _ = answer.send(Some(found));
                    })?;
                in_flight.insert(key, answered.clone());
                answered
            }
        }
    };
    let found = answered
        .wait_for(Option::is_some)
        .await
        .map_err(|_| std::io::Error::other("the name lookup ended without an answer"))?
        .clone();
    let addresses = found
        .unwrap_or_else(|| Err("no answer".into()))
        .map_err(std::io::Error::other)?;
    if addresses.is_empty() {
        return Err(std::io::Error::other("the name has no address"));
    }
    Ok(addresses)
}

/// One HTTPS server (host, port, TLS settings), for async callers: the
/// CLI's [`Client`] and the daemon's witness submitter.
pub struct Endpoint {
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority, an IPv6 address bracketed
    /// and the port only when it is not the scheme's default (RFC 9112
    /// §3.2: the authority component as the URI writes it).
    authority: String,
    prefix: String,
    /// The server name and TLS settings; `None` for plain `http://`.
    tls: Option<(ServerName<'static>, tokio_rustls::TlsConnector)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// A reply, whatever its status.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: hyper::StatusCode,
    /// The `Content-Type`, if any (and if it is text).
    pub content_type: Option<String>,
    /// The whole body.
    pub body: Bytes,
    /// A redirect's `Location`, if any (and if it is text): lavd follows
    /// none, and says where it was sent.
    pub location: Option<String>,
}

impl Endpoint {
    /// The server of `url` (`https://host[:port][/prefix]`), trusting `ca`
    /// for its certificate and presenting `client` (certificate and key
    /// files) when given.
    ///
    /// # Errors
    /// A bad URL, or an unreadable or invalid PEM file.
    pub fn new(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("the URL must start with https://"))?;
        let mut endpoint = Self::plain(rest, 443)?;
        endpoint.tls = Some(Self::tls(&endpoint.host, ca, client)?);
        Ok(endpoint)
    }

    /// The server of a plain `http://host[:port][/prefix]` URL (a witness
    /// on loopback, say: what it returns is checked by signature, not by
    /// the channel).
    ///
    /// # Errors
    /// A bad URL.
    pub fn new_plain(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("the URL must start with http://"))?;
        Self::plain(rest, 80)
    }

    fn plain(rest: &str, default_port: u16) -> anyhow::Result<Self> {
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        // Userinfo (`user:password@host`) first, and not echoed: it may
        // hold a password, and split at its `:` it reads as a port.
        if authority.contains('@') {
            return Err(anyhow!(
                "the URL holds userinfo (`…@`): give the host alone, without a user or password"
            ));
        }
        // An IPv6 address is bracketed, and holds colons of its own.
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| anyhow!("the URL's IPv6 address has no closing `]`"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().context("the URL's port")?,
                None if after.is_empty() => default_port,
                None => return Err(anyhow!("the URL has `{after}` after its IPv6 address")),
            };
            (host.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                // An IPv6 address unbracketed (`http://::1/`) would read
                // as a host `:` and a port.
                Some((h, _)) if h.contains(':') => {
                    return Err(anyhow!(
                        "the URL's host holds `:` (an IPv6 address goes in brackets, \
                         `[::1]:8080`)"
                    ))
                }
                Some((h, p)) => (h.to_string(), p.parse::<u16>().context("the URL's port")?),
                None => (authority.to_string(), default_port),
            }
        };
        // A host, and only a host: not empty (`http:///w`, `http://:8080`
        // would pass to the connect, and fail each request), and not
        // userinfo (`user@host`) or text no host name holds.
        if host.is_empty() {
            return Err(anyhow!("the URL has no host"));
        }
        if let Some(c) = host.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(anyhow!("the URL's host holds {c:?}"));
        }
        let shown_host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            shown_host
        } else {
            format!("{shown_host}:{port}")
        };
        Ok(Endpoint {
            host,
            port,
            authority,
            prefix: prefix.to_string(),
            tls: None,
        })
    }

    fn tls(
        host: &str,
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> anyhow::Result<(ServerName<'static>, tokio_rustls::TlsConnector)> {
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("bad host in URL: {host}"))?;
        // Each file as every input of a command is read: a regular file
        // within its bound (`input_unreadable` otherwise: `/dev/zero` or a
        // FIFO would be read for ever before any request and its timeout).
        let mut roots = rustls::RootCertStore::empty();
        let ca_pem = super::read_input(ca)?;
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            roots
                .add(cert.with_context(|| format!("a certificate in {}", ca.display()))?)
                .context("adding the CA")?;
        }
        if roots.is_empty() {
            return Err(anyhow!("{} holds no PEM certificate", ca.display()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(&super::read_input(cert)?)
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("a certificate in {}", cert.display()))?;
                // The key's bytes are wiped once parsed.
                let key_pem = zeroize::Zeroizing::new(super::read_input(key)?);
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .with_context(|| format!("reading the private key {}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("the client certificate and key")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok((
            server_name,
            tokio_rustls::TlsConnector::from(Arc::new(config)),
        ))
    }

    /// The URL's path prefix (empty, or starting with `/`, no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Sends one request (`body` with its content type makes it a POST,
    /// none a GET) and reads the reply, bounded by `limits`.
    ///
    /// # Errors
    /// A connection or TLS failure, or an [`HttpsError`] when the reply
    /// breaks the [`Limits`].
    pub async fn send(
        &self,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        limits: Limits,
    ) -> anyhow::Result<Reply> {
        let timeout = limits.timeout;
        tokio::time::timeout(
            timeout,
            self.exchange(path, body, limits.max_response_bytes),
        )
        .await
        .unwrap_or_else(|_| {
            Err(HttpsError::Timeout {
                path: path.to_string(),
                timeout,
            }
            .into())
        })
    }

    async fn exchange(
        &self,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        limit: usize,
    ) -> anyhow::Result<Reply> {
        let too_large = || HttpsError::TooLarge {
            path: path.to_string(),
            limit,
        };
        let unreachable = |stage, reason: &dyn std::fmt::Display| HttpsError::Unreachable {
            target: format!("{}:{}", self.host, self.port),
            stage,
            reason: format!("{reason:#}"),
        };
        let addresses = resolve(&self.host, self.port)
            .await
            .map_err(|e| unreachable("name resolution", &e))?;
        let tcp = tokio::net::TcpStream::connect(addresses.as_slice())
            .await
            .map_err(|e| unreachable("connection", &e))?;
        // A request is small writes (headers, body, TLS records): without
        // this, Nagle's algorithm can hold the last one for the peer's
        // delayed ACK, tens of milliseconds a request.
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let mut sender = match &self.tls {
            Some((server_name, connector)) => {
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| unreachable("TLS handshake", &e))?;
                http1(tls)
                    .await
                    .map_err(|e| unreachable("HTTP handshake", &e))?
            }
            None => http1(tcp)
                .await
                .map_err(|e| unreachable("HTTP handshake", &e))?,
        };
        let request = hyper::Request::builder()
            .uri(path)
            .header(hyper::header::HOST, self.authority.as_str())
            // Without it, RFC 9110 lets the server pick any coding.
            .header(hyper::header::ACCEPT_ENCODING, "identity");
        let request = match body {
            Some((content_type, bytes)) => request
                .method(hyper::Method::POST)
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(bytes)),
            None => request
                .method(hyper::Method::GET)
                .body(Full::new(Bytes::new())),
        }
        .context("building the request")?;
        let response = sender.send_request(request).await.context("sending")?;
        let status = response.status();
        // A refusal keeps its status and code (`unexpected_status`), coded
        // or not: only a reply that would be read as data is refused here.
        let coding = response
            .headers()
            .get(hyper::header::CONTENT_ENCODING)
            .filter(|_| status.is_success());
        if let Some(encoding) = coding {
            let encoding = String::from_utf8_lossy(encoding.as_bytes());
            if !encoding.trim().eq_ignore_ascii_case("identity") {
                return Err(HttpsError::Encoded {
                    path: path.to_string(),
                    encoding: encoding.into_owned(),
                }
                .into());
            }
        }
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .filter(|_| status.is_redirection())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // Refuse an announced oversize at once; count what arrives
        // otherwise (chunked, or a length that lies).
        let announced = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Err(too_large().into());
        }
        let body = match http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large().into()),
            Err(e) => return Err(anyhow!(e).context("reading the reply")),
        };
        Ok(Reply {
            status,
            content_type,
            body,
            location,
        })
    }
}

/// An HTTP/1.1 connection over `io`, its driver spawned.
async fn http1<IO>(io: IO) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .context("HTTP handshake")?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A blocking client for one server, for the command-line tools.
pub struct Client {
    endpoint: Endpoint,
    runtime: tokio::runtime::Runtime,
    limits: Limits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `url` (`https://host:port`), trusting `ca` for the
    /// server and presenting `client` (certificate and key files) when
    /// given, each request bounded by `limits`.
    ///
    /// # Errors
    /// A bad URL, or an unreadable or invalid PEM file.
    pub fn new(
        url: &str,
        ca: &Path,
        client: Option<(&Path, &Path)>,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::new(url, ca, client)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the async runtime")?;
        Ok(Client {
            endpoint,
            runtime,
            limits,
        })
    }

    /// GETs `path` and reads the JSON body of a 200 reply as `T`, strictly
    /// ([`crate::codec::from_json`]: `T` denies unknown members; duplicate
    /// members and trailing data are refused), as the daemon reads what it
    /// is sent.
    ///
    /// # Errors
    /// A connection or TLS failure, a non-200 status (with the server's
    /// error code and message), a body that is not `T`'s JSON
    /// (`unexpected_reply`), or an [`HttpsError`] when the reply breaks the
    /// [`Limits`].
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.get_json_within(path, u64::MAX)
    }

    /// [`Self::get_json`] of a reply that can hold at most `most` bytes,
    /// refused as it arrives beyond them, as [`Self::get_bytes_within`].
    ///
    /// # Errors
    /// As [`Self::get_json`].
    pub fn get_json_within<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        most: u64,
    ) -> anyhow::Result<T> {
        let body = self.get_bytes_within(path, most)?;
        crate::codec::from_json(&body).map_err(|e| {
            super::Refused::new(
                "unexpected_reply",
                format!(
                    "the reply is not the JSON expected: {}",
                    crate::codec::escape_for_terminal(&e.to_string())
                ),
            )
            .into()
        })
    }

    /// GETs `path` and returns the body of a 200 reply as it came (a tile,
    /// a checkpoint).
    ///
    /// # Errors
    /// As [`Self::get_json`], but any body is accepted.
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Bytes> {
        self.get_bytes_within(path, u64::MAX)
    }

    /// [`Self::get_bytes`] of a resource that can hold at most `most`
    /// bytes (a checkpoint, a tile): a longer reply is refused as it
    /// arrives (`response_too_large`), not read up to
    /// `--max-response-bytes` first.
    ///
    /// # Errors
    /// As [`Self::get_bytes`].
    pub fn get_bytes_within(&self, path: &str, most: u64) -> anyhow::Result<Bytes> {
        let limits = Limits {
            max_response_bytes: self
                .limits
                .max_response_bytes
                .min(usize::try_from(most).unwrap_or(usize::MAX)),
            ..self.limits
        };
        let reply = self
            .runtime
            .block_on(self.endpoint.send(path, None, limits))?;
        if reply.status != hyper::StatusCode::OK {
            let error: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            // Escaped and cut short: a hostile server's text must not drive
            // the terminal, nor flood it.
            let text = |v: &serde_json::Value, default: &str| {
                v.as_str()
                    .unwrap_or(default)
                    .chars()
                    .take(512)
                    .collect::<String>()
                    .escape_debug()
                    .to_string()
            };
            let mut message = text(&error["error"]["message"], "");
            if message.is_empty() {
                // Not lavd's error body (a proxy's page, a redirect): say
                // what the status means, and where a redirect points.
                let reason = reply
                    .status
                    .canonical_reason()
                    .unwrap_or("no error message");
                message = match &reply.location {
                    Some(to) => format!(
                        "{reason}: redirected to {} (redirects are not followed; give the URL \
                         it names)",
                        text(&serde_json::Value::from(to.as_str()), "")
                    ),
                    None => format!("{reason} (the reply carries no error message)"),
                };
            }
            return Err(HttpsError::Status {
                path: path.to_string(),
                status: reply.status.as_u16(),
                code: text(&error["error"]["code"], "?"),
                message,
            }
            .into());
        }
        Ok(reply.body)
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    /// Released by the test below: the name "hung.test" is looked up until
    /// then.
    static RELEASE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    fn lookup(name: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        if name == "hung.test" {
            while !RELEASE.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
    }

    /// Asks for "panic.test" so far; the first one's lookup panics.
    static PANICS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    fn panicking_once(_: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        if PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("a resolver that panics (test)");
        }
        Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
    }

    /// A lookup whose thread panics fails its callers and leaves nothing
    /// behind: the name is looked up again, not answered "ended without an
    /// answer" for good.
    #[tokio::test]
    async fn a_lookup_that_panics_is_not_kept() {
        let e = super::resolve_with("panic.test", 3, panicking_once)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without an answer"), "{e}");
        let found = super::resolve_with("panic.test", 3, panicking_once)
            .await
            .unwrap();
        assert_eq!(found, [std::net::SocketAddr::from(([127, 0, 0, 1], 3))]);
    }

    /// A name whose lookup hangs, asked for again and again (a witness's
    /// submitter retrying), holds one of the lookup places: every ask joins
    /// the one lookup, and other names are still looked up. Before, each
    /// ask took a place of its own: the ninth was refused, and so was every
    /// other name's until the resolver answered.
    #[tokio::test]
    async fn a_hung_name_holds_one_lookup_place_however_often_it_is_asked() {
        let asks: Vec<_> = (0..3 * super::MAX_LOOKUPS)
            .map(|_| tokio::spawn(super::resolve_with("hung.test", 1, lookup)))
            .collect();
        // Every ask has joined the lookup (or is about to).
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(asks.iter().all(|a| !a.is_finished()));
        let other = super::resolve_with("other.test", 2, lookup).await.unwrap();
        assert_eq!(other, [std::net::SocketAddr::from(([127, 0, 0, 1], 2))]);
        RELEASE.store(true, std::sync::atomic::Ordering::SeqCst);
        for ask in asks {
            let found = ask.await.unwrap().unwrap();
            assert_eq!(found, [std::net::SocketAddr::from(([127, 0, 0, 1], 1))]);
        }
    }

    /// Host, port and prefix of a URL, IPv6 addresses with or without a
    /// port included; malformed authorities are refused.
    #[test]
    fn urls_split_into_host_port_and_prefix() {
        let split = |url: &str| {
            Endpoint::new_plain(url).map(|e| {
                (
                    e.host.clone(),
                    e.port,
                    e.prefix.clone(),
                    e.authority.clone(),
                )
            })
        };
        // The last column is the Host header (RFC 9112 §3.2): brackets
        // kept, a port that is not the default kept. It was the bare host.
        for (url, host, port, prefix, authority) in [
            ("http://[::1]/v1/log", "::1", 80, "/v1/log", "[::1]"),
            ("http://[::1]:8080/v1/", "::1", 8080, "/v1", "[::1]:8080"),
            (
                "http://log.example:99",
                "log.example",
                99,
                "",
                "log.example:99",
            ),
            ("http://log.example", "log.example", 80, "", "log.example"),
            (
                "http://log.example:80/",
                "log.example",
                80,
                "",
                "log.example",
            ),
        ] {
            let want = (
                host.to_string(),
                port,
                prefix.to_string(),
                authority.to_string(),
            );
            assert_eq!(split(url).unwrap(), want, "{url}");
        }
        for bad in [
            "http://[::1",
            "http://[::1]x/",
            "http://[::1]:port",
            "http://host:70000",
            "http:///w",
            "http://:8080",
            "http://user@host:80",
            "http://user:secret@host/",
            "http://[]:80",
            "http://::1/",
        ] {
            assert!(split(bad).is_err(), "{bad}");
        }
        // Userinfo is named, and never echoed (it may be a password).
        let e = split("http://user:secret@host/").unwrap_err().to_string();
        assert!(e.contains("userinfo") && !e.contains("secret"), "{e}");
        // An `@` in the prefix is not userinfo.
        assert_eq!(
            split("http://log.example/a@b").unwrap(),
            (
                "log.example".to_string(),
                80,
                "/a@b".to_string(),
                "log.example".to_string()
            )
        );
    }
}
