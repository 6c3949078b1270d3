//! A small mutual-TLS HTTPS client for the command-line tools (`lavd audit
//! verify --url`): GET requests with a client certificate, against a server
//! certificate checked with a given CA bundle. Same crypto provider as the
//! server (rustls on aws-lc-rs).

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A client for one server.
pub struct Client {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `url` (`https://host:port`), trusting `ca` for the
    /// server and presenting `cert`/`key`.
    ///
    /// # Errors
    /// A bad URL, or an unreadable or invalid PEM file.
    pub fn new(url: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("the URL must start with https://"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse::<u16>().context("the URL's port")?,
            ),
            None => (authority.to_string(), 443),
        };
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| anyhow!("bad host in URL: {host}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("a certificate in {}", ca.display()))?)
                .context("adding the CA")?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("a certificate in {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key {}", key.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("the client certificate and key")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the async runtime")?;
        Ok(Client {
            host,
            port,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            runtime,
        })
    }

    /// GETs `path` and parses the JSON body of a 200 reply.
    ///
    /// # Errors
    /// A connection or TLS failure, a non-200 status (with the server's
    /// error code and message), or a body that is not JSON.
    pub fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .context("TLS handshake")?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .context("HTTP handshake")?;
            tokio::spawn(connection);
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, self.host.as_str())
                .body(Empty::<Bytes>::new())
                .context("building the request")?;
            let response = sender.send_request(request).await.context("sending")?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .context("reading the reply")?
                .to_bytes();
            let value: serde_json::Value =
                serde_json::from_slice(&body).context("the reply is not JSON")?;
            if status != hyper::StatusCode::OK {
                bail!(
                    "GET {path}: {status}: {}: {}",
                    value["error"]["code"].as_str().unwrap_or("?"),
                    value["error"]["message"].as_str().unwrap_or("")
                );
            }
            Ok(value)
        })
    }
}
