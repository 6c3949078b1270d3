//! `lavd audit verify --url` does not trust the server it fetches from: a
//! hostile TLS server (played here by a thread of the test, with a
//! certificate the verifier trusts) that never answers, streams a reply
//! forever or announces a huge one makes the real CLI exit 1 within its
//! bounds (`--timeout`, `--max-response-bytes`, and their defaults) with
//! `response_timeout` or `response_too_large`; one that refuses is named
//! `unexpected_status`, its text escaped; one that compresses is named
//! `response_encoding_unsupported`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::KeyPair as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use softhsm_tests::lavd_command;
use softhsm_tests::server::Ca;

#[derive(Clone, Copy)]
enum Hostile {
    /// Reads the request, then holds the connection without a byte.
    Silent,
    /// A chunked 200 reply that never ends.
    Endless,
    /// Announces a 1 TB body.
    Huge,
    /// Answers 403 with an error whose message holds a terminal escape.
    Refusing,
    /// Answers 200 gzipped (`Content-Encoding: gzip`), as C2SP tlog-tiles
    /// lets a log's static host do whatever was asked, unless the request
    /// asked for `identity` only.
    Gzipping,
    /// Answers 200 with a checkpoint reply that names `checkpoint` twice.
    Duplicating,
    /// Answers 302 to another host, with no body.
    Redirecting,
    /// Answers `/v1/audit/checkpoint` with a checkpoint of 1,000 leaves
    /// signed by [`log_signer`], then every other request with a chunked
    /// 200 reply that never ends: a full page of entries may take more than
    /// `--max-response-bytes`, which bounds it, not a checkpoint's bound.
    EndlessEntries,
    /// Answers `/v1/audit/checkpoint` with a checkpoint of 50 leaves signed
    /// by [`log_signer`], then each entries request with one entry whose
    /// leaf is 1 MiB of base64, within the page's byte bound, counting the
    /// requests in [`FAT_PAGES`].
    FatEntries,
}

/// The entries requests [`Hostile::FatEntries`] answered.
static FAT_PAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The hostile log's signing key: fixed, so that the verifier's `--key`
/// and the checkpoint the server signs agree.
fn log_signer() -> aws_lc_rs::signature::Ed25519KeyPair {
    aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap()
}

const LOG_ORIGIN: &str = "hostile.example/log";

/// Starts the hostile server; returns its port.
fn hostile_server(ca: &Ca, mode: Hostile) -> u16 {
    let issued = ca.server();
    let (_, key_pem) = issued.pem();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(issued.chain.clone(), key)
    .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || serve(tcp, config, mode));
        }
    });
    port
}

fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, mode: Hostile) {
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    match mode {
        Hostile::Silent => std::thread::sleep(Duration::from_secs(120)),
        Hostile::Endless => endless_reply(&mut tls),
        Hostile::Refusing => json_reply(
            &mut tls,
            "403 Forbidden",
            "{\"error\":{\"code\":\"forbidden\",\"message\":\"no\\u001b[2Jway\"}}",
        ),
        Hostile::Gzipping => {
            let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
            let encoding = if head.contains("\r\naccept-encoding: identity\r\n") {
                "gzip"
            } else {
                // Never sent by lavd: the test's assertion names it.
                "x-not-asked-for-identity"
            };
            // gzip's magic bytes, and nothing a JSON reader would take.
            let body = b"\x1f\x8b\x08\x00";
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 content-encoding: {encoding}\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n",
                body.len()
            );
            let _ = tls.write_all(reply.as_bytes());
            let _ = tls.write_all(body);
            let _ = tls.flush();
        }
        Hostile::Duplicating => json_reply(
            &mut tls,
            "200 OK",
            "{\"checkpoint\":\"junk\",\"checkpoint\":\"other junk\"}",
        ),
        Hostile::Redirecting => {
            let reply = "HTTP/1.1 302 Found\r\nlocation: https://elsewhere.example/v1/audit/\
                         checkpoint\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            let _ = tls.write_all(reply.as_bytes());
            let _ = tls.flush();
        }
        Hostile::EndlessEntries if request.starts_with(b"GET /v1/audit/checkpoint ") => {
            signed_checkpoint_reply(&mut tls, 1000);
        }
        Hostile::EndlessEntries => endless_reply(&mut tls),
        Hostile::FatEntries if request.starts_with(b"GET /v1/audit/checkpoint ") => {
            signed_checkpoint_reply(&mut tls, 50);
        }
        Hostile::FatEntries => {
            let index = FAT_PAGES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let entry = serde_json::json!({ "index": index, "leaf": "A".repeat(1 << 20) });
            json_reply(
                &mut tls,
                "200 OK",
                &serde_json::json!({ "entries": [entry] }).to_string(),
            );
        }
        Hostile::Huge => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        content-length: 1000000000000\r\n\r\n[";
            let _ = tls.write_all(head.as_bytes());
            std::thread::sleep(Duration::from_secs(120));
        }
    }
}

/// A 200 reply with a checkpoint of `size` leaves signed by [`log_signer`].
fn signed_checkpoint_reply(tls: &mut impl Write, size: u64) {
    let signer = log_signer();
    let public: [u8; 32] = signer.public_key().as_ref().try_into().unwrap();
    let checkpoint = lavd::audit::note::Checkpoint {
        origin: LOG_ORIGIN.into(),
        size,
        root: [9; 32],
    };
    let note = lavd::audit::note::sign_checkpoint(&checkpoint, &public, |m| {
        Ok::<_, std::convert::Infallible>(signer.sign(m).as_ref().try_into().unwrap())
    })
    .unwrap();
    json_reply(
        tls,
        "200 OK",
        &serde_json::json!({ "checkpoint": note }).to_string(),
    );
}

/// A chunked 200 reply that never ends, until the client goes away.
fn endless_reply(tls: &mut impl Write) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\n\r\n";
    if tls.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
    while tls.write_all(chunk.as_bytes()).is_ok() {}
}

/// A whole JSON reply with `status`, then the connection closed.
fn json_reply(tls: &mut impl Write, status: &str, body: &str) {
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(reply.as_bytes());
    let _ = tls.flush();
}

struct Files {
    dir: tempfile::TempDir,
    servers: Ca,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let servers = Ca::new("hostile server CA");
    let clients = Ca::new("auditor CA");
    let (cert, key) = clients.identity("spiffe://oversight.example/auditor").pem();
    std::fs::write(dir.path().join("ca.pem"), servers.pem()).unwrap();
    std::fs::write(dir.path().join("auditor.pem"), cert).unwrap();
    std::fs::write(dir.path().join("auditor.key"), key).unwrap();
    Files { dir, servers }
}

/// Runs the real CLI against `port` with `extra` flags; returns (exit code,
/// stderr, how long it took).
fn verify(dir: &Path, port: u16, extra: &[&str]) -> (Option<i32>, String, Duration) {
    verify_from(dir, "--url", &format!("https://localhost:{port}"), extra)
}

/// [`verify`] of the log at `url` given as `source` (`--url` or `--tiles`).
fn verify_from(
    dir: &Path,
    source: &str,
    url: &str,
    extra: &[&str],
) -> (Option<i32>, String, Duration) {
    let public: [u8; 32] = log_signer().public_key().as_ref().try_into().unwrap();
    let vkey = lavd::audit::note::verifier_key(LOG_ORIGIN, &public).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let mut args = vec![
        "audit".to_string(),
        "verify".into(),
        "--key".into(),
        vkey,
        source.into(),
        url.into(),
        "--ca".into(),
        p("ca.pem"),
        "--cert".into(),
        p("auditor.pem"),
        "--client-key".into(),
        p("auditor.key"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = softhsm_tests::output_within(&mut lavd_command(&args), softhsm_tests::CLI_LIMIT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_server_that_never_answers_is_cut_at_the_timeout() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Silent);
    let (code, stderr, took) = verify(f.dir.path(), port, &["--timeout", "2"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: response_timeout: ")
            && stderr.contains("/v1/audit/checkpoint")
            && stderr.contains("--timeout"),
        "{stderr}"
    );
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn an_endless_reply_is_cut_at_the_size_bound() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Endless);
    let (code, stderr, took) = verify(
        f.dir.path(),
        port,
        &["--max-response-bytes", "100000", "--timeout", "60"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: response_too_large: ")
            && stderr.contains("larger than 100000 bytes")
            && stderr.contains("--max-response-bytes"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    // The checkpoint's reply is cut at its own bound first.
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: response_too_large: GET /v1/audit/checkpoint"),
        "{stderr}"
    );
    // A good checkpoint, then entries that never end: the defaults bound
    // them (64 MiB or 30 s, whichever comes first).
    let port = hostile_server(&f.servers, Hostile::EndlessEntries);
    let (code, stderr, took) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        (stderr.contains("lavd: response_too_large: GET /v1/audit/entries")
            && stderr.contains("larger than 67108864 bytes"))
            || stderr.contains("lavd: response_timeout: GET /v1/audit/entries"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(45), "took {took:?}");
}

/// A server that answers each entries page with one entry far longer than
/// any leaf (each reply within the page's byte bound) is refused at its
/// first page, `leaf_too_large`, not after every page has been held: the
/// pages' total stays what a file of the same entries may hold.
#[test]
fn an_entry_longer_than_any_leaf_is_refused_at_its_page() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::FatEntries);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: leaf_too_large: entry 0 from GET /v1/audit/entries is 1048576"),
        "{stderr}"
    );
    assert_eq!(FAT_PAGES.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Tiles read over HTTPS are held to each resource's own bound as they
/// arrive (a checkpoint is at most a signed note's 128 KiB), as files are,
/// not read up to `--max-response-bytes` first.
#[test]
fn a_tiles_checkpoint_is_cut_at_a_notes_bound() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Endless);
    let (code, stderr, took) = verify_from(
        f.dir.path(),
        "--tiles",
        &format!("https://localhost:{port}/v1/log"),
        &["--timeout", "60"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    let bound = format!("larger than {} bytes", lavd::audit::note::MAX_NOTE_BYTES);
    assert!(
        stderr.contains("lavd: tile_unavailable: ")
            && stderr.contains("response_too_large")
            && stderr.contains("/v1/log/checkpoint")
            && stderr.contains(&bound),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn an_announced_huge_reply_is_refused_at_once() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Huge);
    let (code, stderr, took) = verify(f.dir.path(), port, &["--timeout", "60"]);
    assert_eq!(code, Some(1), "{stderr}");
    // The checkpoint's reply is held to what a signed note can take as
    // JSON (six bytes for each of its 128 KiB, and the object), below
    // --max-response-bytes' 64 MiB.
    let bound = 6 * lavd::audit::note::MAX_NOTE_BYTES + 64;
    assert!(
        stderr.contains("lavd: response_too_large: GET /v1/audit/checkpoint")
            && stderr.contains(&format!("larger than {bound} bytes")),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// A refusal is `unexpected_status` with the server's code and status, and
/// the server's text reaches the terminal escaped, never raw.
#[test]
fn a_refusal_is_named_and_its_text_escaped() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Refusing);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("lavd: unexpected_status: GET /v1/audit/checkpoint: 403: forbidden: no"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    assert!(stderr.contains("\\u{1b}[2Jway"), "{stderr:?}");
}

/// A redirect is not followed, and its line says so and where it pointed
/// (before, the message was empty: the reply had no error body).
#[test]
fn a_redirect_is_named_not_followed() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Redirecting);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "lavd: unexpected_status: GET /v1/audit/checkpoint: 302: ?: Found: redirected to \
             https://elsewhere.example/v1/audit/checkpoint (redirects are not followed"
        ),
        "{stderr}"
    );
}

/// `--url` with a path (which the API's absolute paths would drop), and
/// a log URL of another scheme than https (which `--tiles` read as a
/// directory), are usage errors that say why, before any connection.
#[test]
fn a_url_with_a_path_or_another_scheme_is_a_usage_error() {
    let f = files();
    let ca = f.dir.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let key = lavd::audit::note::verifier_key("hostile.example/log", &[7; 32]).unwrap();
    for (source, says) in [
        (
            ["--url", "https://localhost:1/v1/audit"],
            "lavd: usage: --url takes the daemon's https://host[:port] only, not the path \
             `/v1/audit`",
        ),
        (
            ["--url", "http://localhost:1"],
            "lavd: usage: `http://localhost:1` is not an https:// URL",
        ),
        (
            ["--tiles", "http://localhost:1/v1/log"],
            "lavd: usage: `http://localhost:1/v1/log` is not an https:// URL",
        ),
    ] {
        let mut args = vec!["audit", "verify", "--key", &key, "--ca", ca];
        args.extend(source);
        let out = softhsm_tests::output_within(&mut lavd_command(&args), softhsm_tests::CLI_LIMIT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(says), "{stderr}");
    }
}

/// A reply is read as strictly as the daemon reads what it is sent: a
/// member given twice is `unexpected_reply`, naming it (before, the last
/// one was taken, as `serde_json::Value` does).
#[test]
fn a_member_given_twice_is_refused() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Duplicating);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("lavd: unexpected_reply: "), "{stderr}");
    assert!(stderr.contains("duplicate field `checkpoint`"), "{stderr}");
}

/// A reply in a content coding lavd does not decode is named as such
/// (`response_encoding_unsupported`), not read as a malformed log; and the
/// request asked for `identity` (RFC 9110: a request without
/// `Accept-Encoding` takes any coding).
#[test]
fn a_compressed_reply_is_named_not_misread() {
    let f = files();
    let port = hostile_server(&f.servers, Hostile::Gzipping);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "lavd: response_encoding_unsupported: GET /v1/audit/checkpoint: the reply is in the \
             content coding \"gzip\""
        ),
        "{stderr}"
    );
}

/// No connection is `connect_failed`, naming the address and the stage
/// (before, these lines had no code): nothing listening, and a server
/// whose certificate is not from `--ca`.
#[test]
fn a_server_that_cannot_be_reached_is_connect_failed() {
    let f = files();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "lavd: connect_failed: localhost:{port}: connection failed: "
        )),
        "{stderr}"
    );
    let stranger = Ca::new("a CA the verifier does not trust");
    let port = hostile_server(&stranger, Hostile::Silent);
    let (code, stderr, _) = verify(f.dir.path(), port, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "lavd: connect_failed: localhost:{port}: TLS handshake failed: "
        )),
        "{stderr}"
    );
}

/// `--ca`, `--cert` and `--client-key` are read as every input of a command
/// is: a regular file within its bound. `/dev/zero` as any of them is
/// `input_unreadable` at once, naming it (it was read until memory ran out,
/// before any request and its timeout).
#[test]
fn a_tls_file_that_is_not_a_regular_file_is_refused() {
    for name in ["ca.pem", "auditor.pem", "auditor.key"] {
        let f = files();
        let file = f.dir.path().join(name);
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
        let (code, stderr, took) = verify(f.dir.path(), 1, &["--timeout", "2"]);
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("lavd: input_unreadable: ") && stderr.contains(name),
            "{name}: {stderr}"
        );
        assert!(took < Duration::from_secs(15), "{name}: took {took:?}");
    }
}
